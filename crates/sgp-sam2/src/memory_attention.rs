//! SAM2 memory attention (in progress; owned by the memory-path work).
//! Contract: `MemoryAttentionConfig` deserialises the yaml `memory_attention:` subtree;
//! `MemoryAttention::new(&cfg, vb.pp("memory_attention"))` loads it with official key names.

use candle_nn::VarBuilder;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct MemoryAttentionConfig {
    #[serde(flatten)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct MemoryAttention {}

impl MemoryAttention {
    pub fn new(_cfg: &MemoryAttentionConfig, _vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {})
    }
}
