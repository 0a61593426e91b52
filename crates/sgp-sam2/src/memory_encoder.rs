//! SAM2 memory encoder (in progress; owned by the memory-path work).
//! Contract: `MemoryEncoderConfig` deserialises the yaml `memory_encoder:` subtree;
//! `MemoryEncoder::new(&cfg, vb.pp("memory_encoder"))` loads it with official key names.

use candle_nn::VarBuilder;

#[derive(Debug, Clone, serde::Deserialize)]
pub struct MemoryEncoderConfig {
    #[serde(flatten)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct MemoryEncoder {}

impl MemoryEncoder {
    pub fn new(_cfg: &MemoryEncoderConfig, _vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {})
    }
}
