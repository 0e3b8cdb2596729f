//! The KV-cache block manager: which blocks are free, who holds the others, and which full blocks
//! hold a known run of tokens (the prefix cache).
//!
//! As in vLLM's automatic prefix caching, a full block is named by a hash chained over every token
//! before it and the adapter that computed it, so a hit means the whole prefix matches. Blocks are
//! reference-counted: requests that share a system prompt share its blocks. A freed block keeps
//! its hash and joins the free queue's tail; allocation takes from the head, so the least
//! recently used cached block is evicted first, and a later request can still revive a freed
//! block that hasn't been reused yet.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// A block's content name: the hash chain over the tokens up to its end.
pub type BlockHash = u64;

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_count: Vec<u32>,
    /// The hash of the tokens a block holds, when it is full and registered.
    hash_of: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
    /// Free blocks by the time they were freed: the first is the next to be handed out.
    free: BTreeSet<(u64, u32)>,
    freed_at: Vec<u64>,
    clock: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            ref_count: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
            free: (0..num_blocks as u32).map(|b| (u64::from(b), b)).collect(),
            freed_at: (0..num_blocks as u64).collect(),
            clock: num_blocks as u64,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_count.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Hashes of the full blocks of `tokens`, chained from the first; `salt` (the adapter)
    /// separates the caches of different weights.
    pub fn block_hashes(&self, tokens: &[u32], salt: u64) -> Vec<BlockHash> {
        let mut parent = salt;
        tokens
            .chunks_exact(self.block_size)
            .map(|block| {
                let mut h = DefaultHasher::new();
                parent.hash(&mut h);
                block.hash(&mut h);
                parent = h.finish();
                parent
            })
            .collect()
    }

    /// Takes the longest run of `hashes` already cached, holding each block it takes.
    pub fn take_cached(&mut self, hashes: &[BlockHash]) -> Vec<u32> {
        let mut blocks = Vec::new();
        for h in hashes {
            let Some(&b) = self.cached.get(h) else { break };
            self.hold(b);
            blocks.push(b);
        }
        blocks
    }

    fn hold(&mut self, b: u32) {
        let i = b as usize;
        if self.ref_count[i] == 0 {
            self.free.remove(&(self.freed_at[i], b));
        }
        self.ref_count[i] += 1;
    }

    /// A fresh block, evicting the least recently freed cached one; `None` when every block is
    /// held.
    pub fn allocate(&mut self) -> Option<u32> {
        let (_, b) = self.free.pop_first()?;
        let i = b as usize;
        if let Some(h) = self.hash_of[i].take()
            && self.cached.get(&h) == Some(&b)
        {
            self.cached.remove(&h);
        }
        self.ref_count[i] = 1;
        Some(b)
    }

    /// Names a full, computed block by its hash so later prompts can share it (unless another
    /// block already holds the same tokens).
    pub fn register(&mut self, b: u32, hash: BlockHash) {
        let i = b as usize;
        if self.hash_of[i].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(b);
            self.hash_of[i] = Some(hash);
        }
    }

    /// Releases a sequence's blocks, last first, so that a prefix's deepest block is evicted
    /// before its shallower ones.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let i = b as usize;
            debug_assert!(self.ref_count[i] > 0, "block {b} released twice");
            self.ref_count[i] = self.ref_count[i].saturating_sub(1);
            if self.ref_count[i] == 0 {
                self.clock += 1;
                self.freed_at[i] = self.clock;
                self.free.insert((self.clock, b));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_share_blocks_and_survive_until_evicted() {
        let mut m = BlockManager::new(4, 2);
        let a = [1, 2, 3, 4, 5];
        let hashes = m.block_hashes(&a, 0);
        assert_eq!(hashes.len(), 2, "only full blocks are named");
        let blocks: Vec<u32> = (0..3).map(|_| m.allocate().unwrap()).collect();
        m.register(blocks[0], hashes[0]);
        m.register(blocks[1], hashes[1]);
        // A second prompt with the same first block, then different tokens.
        let b = m.block_hashes(&[1, 2, 9, 9], 0);
        assert_eq!(b[0], hashes[0]);
        assert_ne!(b[1], hashes[1]);
        assert_eq!(m.take_cached(&b), vec![blocks[0]]);
        // Another adapter shares nothing.
        assert!(m.take_cached(&m.block_hashes(&a, 1)).is_empty());
        m.release(&blocks);
        m.release(&blocks[..1]);
        assert_eq!(m.num_free(), 4);
        // Freed but not yet reused: still a hit.
        assert_eq!(m.take_cached(&hashes), blocks[..2].to_vec());
        m.release(&blocks[..2]);
        // Allocating everything evicts them.
        for _ in 0..4 {
            m.allocate().unwrap();
        }
        assert!(m.allocate().is_none());
        assert!(m.take_cached(&hashes).is_empty());
    }
}
