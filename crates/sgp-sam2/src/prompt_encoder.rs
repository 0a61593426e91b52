//! SAM's prompt encoder (`sam2.modeling.sam.prompt_encoder.PromptEncoder`).
//!
//! Points (and boxes given as two corner points with labels 2/3) become sparse tokens:
//! a random-Fourier positional encoding of the pixel centre plus a learned embedding per
//! label. Mask prompts become a dense map through a small strided conv stack; without a
//! mask, a learned `no_mask_embed` fills the map.
//!
//! Weights load from `sam_prompt_encoder.*` (pass `vb.pp("sam_prompt_encoder")`).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::ops::{conv2d, LayerNorm2d};

/// Point label meaning "not a point" (padding).
pub const LABEL_PADDING: f32 = -1.0;

/// `PositionEmbeddingRandom`: `[sin(2π(2p-1)G), cos(2π(2p-1)G)]` for normalised p.
#[derive(Debug, Clone)]
pub struct PositionEmbeddingRandom {
    /// `[2, num_pos_feats]`, a buffer in the checkpoint.
    pub gaussian_matrix: Tensor,
}

impl PositionEmbeddingRandom {
    pub fn new(num_pos_feats: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gaussian_matrix: vb.get((2, num_pos_feats), "positional_encoding_gaussian_matrix")?,
        })
    }

    /// Encodes coordinates already normalised to [0, 1]; `coords` is `[..., 2]` (x, y).
    pub fn pe_encoding(&self, coords: &Tensor) -> Result<Tensor> {
        let dims = coords.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let c = ((coords * 2.0)? - 1.0)?;
        let c = c.reshape((n, 2))?.matmul(&self.gaussian_matrix)?;
        // PyTorch multiplies by the Python double 2π, cast to f32 for the f32 kernel.
        let c = (c * ((2.0 * std::f64::consts::PI) as f32 as f64))?;
        let out = Tensor::cat(&[c.sin()?, c.cos()?], D::Minus1)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(out.dim(1)?);
        out.reshape(out_dims)
    }

    /// Dense encoding of an `h × w` grid of cell centres: `[C, h, w]`.
    pub fn forward_grid(&self, h: usize, w: usize) -> Result<Tensor> {
        let dev = self.gaussian_matrix.device();
        // (cumsum(ones) - 0.5) / size, computed in f32 as PyTorch does.
        let xs: Vec<f32> = (0..w).map(|i| ((i + 1) as f32 - 0.5) / w as f32).collect();
        let ys: Vec<f32> = (0..h).map(|i| ((i + 1) as f32 - 0.5) / h as f32).collect();
        let mut grid = Vec::with_capacity(h * w * 2);
        for y in &ys {
            for x in &xs {
                grid.push(*x);
                grid.push(*y);
            }
        }
        let grid = Tensor::from_vec(grid, (h, w, 2), dev)?.to_dtype(self.gaussian_matrix.dtype())?;
        crate::ops::contiguous(&self.pe_encoding(&grid)?.permute((2, 0, 1))?)
    }

    /// Encodes pixel coordinates `[B, N, 2]` (x, y) of an image of `image_size` = (h, w).
    pub fn forward_with_coords(&self, coords: &Tensor, image_size: (usize, usize)) -> Result<Tensor> {
        let (h, w) = image_size;
        // Division (not multiplication by the reciprocal) to match PyTorch bit for bit.
        let size = Tensor::new(&[w as f32, h as f32], coords.device())?.to_dtype(coords.dtype())?;
        let normed = coords.broadcast_div(&size)?;
        self.pe_encoding(&normed)
    }
}

/// The SAM prompt encoder.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    pub embed_dim: usize,
    /// (h, w) of the image embedding, S / backbone_stride.
    pub image_embedding_size: (usize, usize),
    /// (h, w) of the model input, S.
    pub input_image_size: (usize, usize),
    /// (h, w) of a dense mask prompt, 4 × the embedding size.
    pub mask_input_size: (usize, usize),
    pub pe_layer: PositionEmbeddingRandom,
    /// Labels 0 (negative), 1 (positive), 2 (box top-left), 3 (box bottom-right); `[1, C]` each.
    pub point_embeddings: Vec<Tensor>,
    pub not_a_point_embed: Tensor,
    pub no_mask_embed: Tensor,
    mask_conv1: Conv2d,
    mask_ln1: LayerNorm2d,
    mask_conv2: Conv2d,
    mask_ln2: LayerNorm2d,
    mask_conv3: Conv2d,
    /// `get_dense_pe()` depends only on a buffer, so it is computed once.
    dense_pe: Tensor,
}

impl PromptEncoder {
    /// `mask_in_chans` is 16 in SAM2 (hard-coded in `SAM2Base._build_sam_heads`).
    pub fn new(
        embed_dim: usize,
        image_embedding_size: (usize, usize),
        input_image_size: (usize, usize),
        mask_in_chans: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if !embed_dim.is_multiple_of(2) || !mask_in_chans.is_multiple_of(4) {
            candle_core::bail!(
                "prompt encoder: embed_dim ({embed_dim}) must be even and mask_in_chans ({mask_in_chans}) a multiple of 4"
            );
        }
        let pe_layer = PositionEmbeddingRandom::new(embed_dim / 2, vb.pp("pe_layer"))?;
        let point_embeddings = (0..4)
            .map(|i| vb.get((1, embed_dim), &format!("point_embeddings.{i}.weight")))
            .collect::<Result<Vec<_>>>()?;
        let not_a_point_embed = vb.get((1, embed_dim), "not_a_point_embed.weight")?;
        let no_mask_embed = vb.get((1, embed_dim), "no_mask_embed.weight")?;
        let s2 = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let md = vb.pp("mask_downscaling");
        let q = mask_in_chans / 4;
        let mask_conv1 = candle_nn::conv2d(1, q, 2, s2, md.pp("0"))?;
        let mask_ln1 = LayerNorm2d::new(q, 1e-6, md.pp("1"))?;
        let mask_conv2 = candle_nn::conv2d(q, mask_in_chans, 2, s2, md.pp("3"))?;
        let mask_ln2 = LayerNorm2d::new(mask_in_chans, 1e-6, md.pp("4"))?;
        let mask_conv3 = candle_nn::conv2d(mask_in_chans, embed_dim, 1, Default::default(), md.pp("6"))?;
        let dense_pe = pe_layer
            .forward_grid(image_embedding_size.0, image_embedding_size.1)?
            .unsqueeze(0)?;
        Ok(Self {
            embed_dim,
            image_embedding_size,
            input_image_size,
            mask_input_size: (4 * image_embedding_size.0, 4 * image_embedding_size.1),
            pe_layer,
            point_embeddings,
            not_a_point_embed,
            no_mask_embed,
            mask_conv1,
            mask_ln1,
            mask_conv2,
            mask_ln2,
            mask_conv3,
            dense_pe,
        })
    }

    /// Positional encoding of the image-embedding grid, `[1, C, h, w]`.
    pub fn get_dense_pe(&self) -> &Tensor {
        &self.dense_pe
    }

    /// Embeds points `[B, N, 2]` (pixels in the S×S frame) with labels `[B, N]` (any
    /// float/int dtype). With `pad`, one extra (0,0) point of label -1 is appended, as the
    /// official code does whenever no box tensor is passed.
    pub fn embed_points(&self, points: &Tensor, labels: &Tensor, pad: bool) -> Result<Tensor> {
        let (b, n, two) = points.dims3()?;
        if two != 2 || labels.dims() != [b, n] {
            candle_core::bail!(
                "prompt encoder: points must be [B,N,2] and labels [B,N], got {:?} and {:?}",
                points.dims(),
                labels.dims()
            );
        }
        let points = (points.to_dtype(DType::F32)? + 0.5)?;
        let labels = labels.to_dtype(DType::F32)?;
        let (points, labels) = if pad {
            let pp = Tensor::zeros((b, 1, 2), DType::F32, points.device())?;
            let pl = Tensor::full(LABEL_PADDING, (b, 1), points.device())?;
            (Tensor::cat(&[&points, &pp], 1)?, Tensor::cat(&[&labels, &pl], 1)?)
        } else {
            (points, labels)
        };
        let pe = self.pe_layer.forward_with_coords(&points, self.input_image_size)?;
        let labels = labels.unsqueeze(D::Minus1)?; // [B, N', 1]
                                                   // Masks as 0/1 multipliers (exact, and differentiable, unlike index tricks).
        let is = |v: f32| -> Result<Tensor> { labels.eq(v)?.to_dtype(pe.dtype()) };
        let pad_m = is(LABEL_PADDING)?;
        let mut emb =
            (pe.broadcast_mul(&(1.0 - &pad_m)?)? + pad_m.broadcast_mul(&self.not_a_point_embed.unsqueeze(0)?)?)?;
        for (k, w) in self.point_embeddings.iter().enumerate() {
            let m = is(k as f32)?;
            emb = (emb + m.broadcast_mul(&w.unsqueeze(0)?)?)?;
        }
        Ok(emb)
    }

    /// Embeds boxes `[B, 4]` (x0, y0, x1, y1 pixels) as two corner tokens.
    pub fn embed_boxes(&self, boxes: &Tensor) -> Result<Tensor> {
        let boxes = (boxes.to_dtype(DType::F32)? + 0.5)?;
        let coords = boxes.reshape(((), 2, 2))?;
        let pe = self.pe_layer.forward_with_coords(&coords, self.input_image_size)?;
        let corner = Tensor::cat(&[&self.point_embeddings[2], &self.point_embeddings[3]], 0)?;
        pe.broadcast_add(&corner.unsqueeze(0)?)
    }

    /// Dense embedding of a mask prompt `[B, 1, 4h, 4w]` -> `[B, C, h, w]`.
    pub fn embed_masks(&self, masks: &Tensor) -> Result<Tensor> {
        let (_, c, mh, mw) = masks.dims4()?;
        if c != 1 || (mh, mw) != self.mask_input_size {
            candle_core::bail!(
                "prompt encoder: mask prompt must be [B,1,{},{}], got {:?}",
                self.mask_input_size.0,
                self.mask_input_size.1,
                masks.dims()
            );
        }
        let x = self.mask_ln1.forward_gelu(&conv2d(&self.mask_conv1, masks)?)?;
        let x = self.mask_ln2.forward_gelu(&conv2d(&self.mask_conv2, &x)?)?;
        conv2d(&self.mask_conv3, &x)
    }

    /// Returns (sparse `[B, N, C]`, dense `[B, C, h, w]`) like `PromptEncoder.forward`.
    pub fn forward(
        &self,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        masks: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let bs = match (points, boxes, masks) {
            (Some((p, _)), _, _) => p.dim(0)?,
            (None, Some(b), _) => b.dim(0)?,
            (None, None, Some(m)) => m.dim(0)?,
            _ => 1,
        };
        let dev = self.no_mask_embed.device();
        let mut parts = Vec::new();
        if let Some((coords, labels)) = points {
            parts.push(self.embed_points(coords, labels, boxes.is_none())?);
        }
        if let Some(b) = boxes {
            parts.push(self.embed_boxes(b)?);
        }
        let sparse = if parts.is_empty() {
            Tensor::zeros((bs, 0, self.embed_dim), DType::F32, dev)?
        } else {
            Tensor::cat(&parts, 1)?
        };
        let dense = match masks {
            Some(m) => self.embed_masks(&m.to_dtype(DType::F32)?)?,
            None => {
                let (h, w) = self.image_embedding_size;
                self.no_mask_embed
                    .reshape((1, self.embed_dim, 1, 1))?
                    .expand((bs, self.embed_dim, h, w))?
            }
        };
        Ok((sparse, dense))
    }
}
