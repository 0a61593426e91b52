//! Which layers get adapters: module-path patterns, and which slices of their output
//! (syntax in [`Target`]'s docs).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::{LoraError, Result};

/// A module-path pattern plus the chunks of the layer's output to adapt.
///
/// # Pattern syntax
/// A module path is a dot-separated list of segments, e.g.
/// `image_encoder.trunk.blocks.3.attn.qkv`. A pattern is matched segment by segment:
/// - a literal segment matches itself;
/// - `*` inside a segment matches any run of characters except `.` (so `blocks.*.attn`
///   matches every block, `layers.[01]` is *not* supported: keep it simple);
/// - a whole segment `**` matches zero or more segments.
///
/// # Fused outputs
/// Hiera's attention computes q, k and v with one fused linear `qkv` (output
/// `[q | k | v]`, three equal chunks). A target may adapt only some chunks:
/// `PATTERN[0,2/3]` splits the output into 3 equal chunks and adapts chunks 0 (q) and 2
/// (v), each with its own A and B. `PATTERN[q,v]` is shorthand for that three-chunk
/// split (`q`, `k`, `v` = chunks 0, 1, 2). A target without brackets adapts the whole
/// output. In blocks where Hiera changes width, `qkv` maps `dim -> 3*dim_out`, so the
/// q chunk is rows `[0, dim_out)` and the v chunk rows `[2*dim_out, 3*dim_out)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pattern: String,
    /// The output splits into `chunks` equal parts (1 = no split).
    chunks: usize,
    /// Sorted, distinct chunk indices that get an adapter.
    selected: Vec<usize>,
}

impl Target {
    /// Adapts the whole output of every layer matching `pattern`.
    pub fn whole(pattern: &str) -> Result<Self> {
        Self::fused(pattern, 1, &[0])
    }

    /// Splits the output into `chunks` equal parts and adapts the `selected` ones.
    pub fn fused(pattern: &str, chunks: usize, selected: &[usize]) -> Result<Self> {
        let invalid = |reason: String| LoraError::InvalidTarget {
            spec: pattern.to_string(),
            reason,
        };
        validate_pattern(pattern).map_err(invalid)?;
        if chunks == 0 {
            return Err(invalid("the number of chunks must be positive".into()));
        }
        let mut selected = selected.to_vec();
        selected.sort_unstable();
        selected.dedup();
        if selected.is_empty() {
            return Err(invalid("no chunk selected".into()));
        }
        if let Some(&bad) = selected.iter().find(|&&c| c >= chunks) {
            return Err(invalid(format!("chunk {bad} does not exist in a {chunks}-chunk split")));
        }
        Ok(Self {
            pattern: pattern.to_string(),
            chunks,
            selected,
        })
    }

    /// The paper's default: the q and v parts of every Hiera block's fused `qkv`.
    pub fn hiera_qv() -> Self {
        Self {
            pattern: "**.trunk.blocks.*.attn.qkv".into(),
            chunks: 3,
            selected: vec![0, 2],
        }
    }

    /// All of q, k and v of every Hiera block.
    pub fn hiera_qkv() -> Self {
        Self {
            pattern: "**.trunk.blocks.*.attn.qkv".into(),
            chunks: 1,
            selected: vec![0],
        }
    }

    /// The attention output projection of every Hiera block.
    pub fn hiera_attn_proj() -> Self {
        Self {
            pattern: "**.trunk.blocks.*.attn.proj".into(),
            chunks: 1,
            selected: vec![0],
        }
    }

    /// Both MLP layers of every Hiera block.
    pub fn hiera_mlp() -> Self {
        Self {
            pattern: "**.trunk.blocks.*.mlp.layers.*".into(),
            chunks: 1,
            selected: vec![0],
        }
    }

    /// The glob over checkpoint paths (`*` one segment, `**` any number).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// How many equal fused parts the layer's output splits into (3 for `qkv`).
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// The chunks that get an adapter.
    pub fn selected(&self) -> &[usize] {
        &self.selected
    }

    /// Whether the module `path` matches this target's pattern.
    pub fn matches(&self, path: &str) -> bool {
        let pat: Vec<&str> = self.pattern.split('.').collect();
        let segs: Vec<&str> = path.split('.').collect();
        match_segments(&pat, &segs)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.chunks == 1 {
            return write!(f, "{}", self.pattern);
        }
        let sel: Vec<String> = self.selected.iter().map(|c| c.to_string()).collect();
        write!(f, "{}[{}/{}]", self.pattern, sel.join(","), self.chunks)
    }
}

impl FromStr for Target {
    type Err = LoraError;

    fn from_str(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        let invalid = |reason: &str| LoraError::InvalidTarget {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let Some(open) = spec.find('[') else {
            return Self::whole(spec);
        };
        let Some(inner) = spec[open + 1..].strip_suffix(']') else {
            return Err(invalid("a `[` must be closed by a final `]`"));
        };
        let pattern = &spec[..open];
        let (sel, chunks) = match inner.split_once('/') {
            Some((sel, n)) => {
                let n = n
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| invalid("the chunk count after `/` must be a number"))?;
                (sel, Some(n))
            }
            None => (inner, None),
        };
        let mut selected = Vec::new();
        let mut uses_letters = false;
        for item in sel.split(',') {
            let item = item.trim();
            let index = match item {
                "q" => Some(0),
                "k" => Some(1),
                "v" => Some(2),
                _ => None,
            };
            match index {
                Some(i) => {
                    uses_letters = true;
                    selected.push(i);
                }
                None => selected.push(
                    item.parse::<usize>()
                        .map_err(|_| invalid("chunks are numbers or the letters q, k, v"))?,
                ),
            }
        }
        let chunks = match chunks {
            Some(3) | None if uses_letters => 3,
            Some(n) if !uses_letters => n,
            None => return Err(invalid("numeric chunks need the chunk count, e.g. `[0,2/3]`")),
            Some(_) => return Err(invalid("the letters q, k, v imply a 3-chunk split")),
        };
        Self::fused(pattern, chunks, &selected)
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn validate_pattern(pattern: &str) -> std::result::Result<(), String> {
    if pattern.is_empty() {
        return Err("the pattern is empty".into());
    }
    for seg in pattern.split('.') {
        if seg.is_empty() {
            return Err("empty path segment (two dots, or a leading/trailing dot)".into());
        }
        if seg.contains("**") && seg != "**" {
            return Err("`**` must be a whole segment".into());
        }
        if seg
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '[' | ']' | '/' | ','))
        {
            return Err(format!("segment `{seg}` holds a reserved character"));
        }
    }
    Ok(())
}

fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((&"**", rest)) => (0..=segs.len()).any(|skip| match_segments(rest, &segs[skip..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => match_segment(p.as_bytes(), s.as_bytes()) && match_segments(rest, srest),
            None => false,
        },
    }
}

/// `*` matches any run of characters within one segment.
fn match_segment(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|skip| match_segment(rest, &s[skip..])),
        Some((c, rest)) => s.first() == Some(c) && match_segment(rest, &s[1..]),
    }
}

/// A layer selected by the targets, with the output rows each adapter corrects.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedLayer {
    /// Checkpoint path of the linear layer.
    pub path: String,
    /// Input features.
    pub in_dim: usize,
    /// Output features (all chunks).
    pub out_dim: usize,
    /// Chunks the output is split into (1 = whole output).
    pub chunks: usize,
    /// Adapted chunk indices, sorted.
    pub selected: Vec<usize>,
}

impl ResolvedLayer {
    /// Output rows corrected by the adapter of chunk `chunk`.
    pub fn rows(&self, chunk: usize) -> Range<usize> {
        let size = self.out_dim / self.chunks;
        chunk * size..(chunk + 1) * size
    }

    /// Trainable parameters at rank `rank`: each adapted chunk has A `[r, in]` and B `[chunk_out, r]`.
    pub fn num_params(&self, rank: usize) -> usize {
        self.selected.len() * rank * (self.in_dim + self.out_dim / self.chunks)
    }
}

/// Resolves `targets` against a model's layers `(path, in_dim, out_dim)`. The first
/// target that matches a layer decides how it is adapted. The result is sorted by path.
/// Errors when nothing matches (a typo in a pattern should not silently train nothing).
pub fn resolve<'a>(
    layers: impl IntoIterator<Item = (&'a str, usize, usize)>,
    targets: &[Target],
) -> Result<Vec<ResolvedLayer>> {
    let mut resolved = Vec::new();
    for (path, in_dim, out_dim) in layers {
        let Some(target) = targets.iter().find(|t| t.matches(path)) else {
            continue;
        };
        if out_dim % target.chunks != 0 {
            return Err(LoraError::IndivisibleOutput {
                path: path.to_string(),
                out_dim,
                chunks: target.chunks,
            });
        }
        resolved.push(ResolvedLayer {
            path: path.to_string(),
            in_dim,
            out_dim,
            chunks: target.chunks,
            selected: target.selected.clone(),
        });
    }
    if resolved.is_empty() {
        return Err(LoraError::NoMatchingLayer {
            targets: targets.iter().map(|t| t.to_string()).collect(),
        });
    }
    resolved.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matching() {
        let t = Target::hiera_qv();
        assert!(t.matches("image_encoder.trunk.blocks.3.attn.qkv"));
        assert!(t.matches("trunk.blocks.12.attn.qkv"));
        assert!(!t.matches("image_encoder.trunk.blocks.3.attn.proj"));
        assert!(!t.matches("image_encoder.trunk.blocks.3.qkv"));
        assert!(!t.matches("image_encoder.trunk.blocks.3.attn.qkv.extra"));
        let mlp = Target::hiera_mlp();
        assert!(mlp.matches("image_encoder.trunk.blocks.0.mlp.layers.1"));
        assert!(!mlp.matches("sam_mask_decoder.mlp.layers.1"));
        let star = Target::whole("a.b*c.d").unwrap();
        assert!(star.matches("a.bc.d"));
        assert!(star.matches("a.bxyzc.d"));
        assert!(!star.matches("a.bx.yc.d"));
        let any = Target::whole("**").unwrap();
        assert!(any.matches("x.y.z"));
        let mid = Target::whole("a.**.z").unwrap();
        assert!(mid.matches("a.z"));
        assert!(mid.matches("a.b.c.z"));
        assert!(!mid.matches("a.b.c"));
    }

    #[test]
    fn parse_and_display_round_trip() {
        let t: Target = "**.attn.qkv[q,v]".parse().unwrap();
        assert_eq!(t.chunks(), 3);
        assert_eq!(t.selected(), &[0, 2]);
        assert_eq!(t.to_string(), "**.attn.qkv[0,2/3]");
        assert_eq!(t.to_string().parse::<Target>().unwrap(), t);
        let w: Target = "**.attn.proj".parse().unwrap();
        assert_eq!((w.chunks(), w.selected()), (1, &[0usize][..]));
        assert_eq!(w.to_string(), "**.attn.proj");
        assert_eq!(
            Target::hiera_qv().to_string().parse::<Target>().unwrap(),
            Target::hiera_qv()
        );
    }

    #[test]
    fn bad_specs_are_errors() {
        for bad in [
            "", "a..b", ".a", "a.**x", "a[0,2]", "a[0,3/3]", "a[q/2]", "a[0,2/3", "a[]", "a[x/3]", "a[0/0]",
        ] {
            assert!(bad.parse::<Target>().is_err(), "`{bad}` should not parse");
        }
    }

    #[test]
    fn resolution_rows_and_errors() {
        let layers = [
            ("m.trunk.blocks.1.attn.qkv", 4, 24),
            ("m.trunk.blocks.1.attn.proj", 8, 8),
        ];
        let r = resolve(layers, &[Target::hiera_qv()]).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].rows(0), 0..8);
        assert_eq!(r[0].rows(2), 16..24);
        assert_eq!(r[0].num_params(2), 2 * 2 * (4 + 8));
        let none = resolve(layers, &[Target::whole("x.*").unwrap()]);
        assert!(matches!(none, Err(LoraError::NoMatchingLayer { .. })));
        let odd = resolve([("a", 3, 10)], &[Target::fused("a", 3, &[0]).unwrap()]);
        assert!(matches!(odd, Err(LoraError::IndivisibleOutput { .. })));
    }
}
