//! Keys and values of past positions, so decoding a token costs one position's work.
//!
//! Each layer's buffer is allocated in chunks and written in place (`slice_set`); attention reads
//! a narrowed view, so appending a token copies only that token's keys and values.

use candle_core::{Result, Tensor};

const CHUNK: usize = 256;

#[derive(Debug, Clone, Default)]
struct LayerCache {
    /// `[batch, kv_heads, capacity, head_dim]`
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// The KV cache of one batch of sequences (all of the same length), outside the model's weights.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
        }
    }

    /// Number of positions cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerCache::default();
        }
    }

    /// Appends `k`, `v` (`[batch, kv_heads, seq, head_dim]`) to `layer`'s cache and returns views
    /// of every cached position.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let cache = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("no KV cache for layer {layer}")))?;
        let (b, h, s, d) = k.dims4()?;
        let needed = cache.len + s;
        let capacity = cache.k.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
        if needed > capacity {
            let new_capacity = needed.div_ceil(CHUNK) * CHUNK;
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, h, new_capacity, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, cache.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let (nk, nv) = (grow(&cache.k)?, grow(&cache.v)?);
            cache.k = Some(nk);
            cache.v = Some(nv);
        }
        let (ck, cv) = match (&cache.k, &cache.v) {
            (Some(ck), Some(cv)) => (ck, cv),
            _ => candle_core::bail!("KV cache buffers missing for layer {layer}"),
        };
        ck.slice_set(&k.contiguous()?, 2, cache.len)?;
        cv.slice_set(&v.contiguous()?, 2, cache.len)?;
        cache.len = needed;
        Ok((ck.narrow(2, 0, needed)?, cv.narrow(2, 0, needed)?))
    }
}
