//! The batched forward pass over a paged KV cache against the one-sequence cached forward pass:
//! sequences of different lengths at different positions, prefilled whole or in chunks, on
//! scattered blocks, with different adapters in one batch, give each sequence the logits it gets
//! alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::Tensor;
use common::*;
use kiln_model::{CausalLm, LoraAdapter, PagedKvCache, PagedSeq};

const TOL: f32 = 1e-4;

/// Logits of each position of `ids` from the reference path: the contiguous KV cache, one token
/// at a time after a prefill of `prefill` tokens.
fn reference_logits(model: &CausalLm, ids: &[u32], prefill: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let first = Tensor::new(&ids[..prefill], model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&first, Some(&mut cache)).unwrap();
    for p in 0..prefill {
        out.push(logits.get(0).unwrap().get(p).unwrap().to_vec1().unwrap());
    }
    for &t in &ids[prefill..] {
        let x = Tensor::new(&[t], model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        out.push(
            model
                .forward_last(&x, Some(&mut cache))
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1()
                .unwrap(),
        );
    }
    out
}

/// A sequence's state in the test's toy scheduler.
struct Seq {
    ids: Vec<u32>,
    adapter: Option<usize>,
    table: Vec<u32>,
    done: usize,
}

/// Runs `seqs` to the end with chunks of at most `chunk` tokens per sequence and step, all in
/// one batch per step, handing out blocks from the end of the pool backwards (so no sequence's
/// blocks are contiguous); returns each sequence's logits at every position it ended a step on.
fn run_paged(
    model: &CausalLm,
    adapters: &[&CausalLm],
    seqs: &mut [Seq],
    chunk: usize,
    block_size: usize,
) -> Vec<Vec<(usize, Vec<f32>)>> {
    let mut cache = PagedKvCache::new(model, 64, block_size);
    let mut next_block = 63u32;
    let mut logits = vec![Vec::new(); seqs.len()];
    loop {
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].done < seqs[i].ids.len())
            .collect();
        if active.is_empty() {
            return logits;
        }
        let mut spans = Vec::new();
        for &i in &active {
            let s = &mut seqs[i];
            let n = chunk.min(s.ids.len() - s.done);
            while s.table.len() * block_size < s.done + n {
                s.table.push(next_block);
                next_block -= 1;
            }
            spans.push((i, s.done, n));
        }
        let batch: Vec<PagedSeq> = spans
            .iter()
            .map(|&(i, start, n)| PagedSeq {
                tokens: &seqs[i].ids[start..start + n],
                start,
                block_table: &seqs[i].table,
                adapter: seqs[i].adapter,
            })
            .collect();
        let out = model.forward_paged(&batch, &mut cache, adapters).unwrap();
        for (row, &(i, start, n)) in spans.iter().enumerate() {
            logits[i].push((start + n - 1, out.get(row).unwrap().to_vec1().unwrap()));
            seqs[i].done += n;
        }
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 5 + (seed * 37 + i * 11) % 400)
        .collect()
}

#[test]
fn a_batch_of_uneven_sequences_matches_each_sequence_alone() {
    for (name, dir) in [
        ("llama", llama_dir()),
        ("mistral", testdata().join("mistral")),
    ] {
        let loaded = load(&dir);
        let model = &loaded.model;
        for (chunk, block_size) in [(usize::MAX, 16), (5, 4), (3, 16)] {
            let mut seqs: Vec<Seq> = [(1, 7), (2, 30), (3, 1), (4, 19)]
                .iter()
                .map(|&(seed, len)| Seq {
                    ids: prompt(seed, len),
                    adapter: None,
                    table: Vec::new(),
                    done: 0,
                })
                .collect();
            let got = run_paged(model, &[], &mut seqs, chunk, block_size);
            for (s, got) in seqs.iter().zip(&got) {
                let want = reference_logits(model, &s.ids, 1);
                for (pos, logits) in got {
                    let diff = max_abs_diff(logits, &want[*pos]);
                    assert!(
                        diff < TOL,
                        "{name}, chunk {chunk}, block {block_size}: sequence of {} tokens, position {pos}: max diff {diff}",
                        s.ids.len()
                    );
                }
            }
        }
    }
}

#[test]
fn different_adapters_share_a_batch() {
    let loaded = load(&llama_dir());
    let base = &loaded.model;
    let adapter = LoraAdapter::load(&lora_dir(), base.dtype(), base.device()).unwrap();
    let mut with_lora = base.clone();
    adapter.apply(&mut with_lora).unwrap();
    let mut seqs: Vec<Seq> = [
        (1, 9, Some(0)),
        (2, 12, None),
        (3, 6, Some(0)),
        (4, 4, None),
    ]
    .iter()
    .map(|&(seed, len, adapter)| Seq {
        ids: prompt(seed, len),
        adapter,
        table: Vec::new(),
        done: 0,
    })
    .collect();
    let got = run_paged(base, &[&with_lora], &mut seqs, 4, 4);
    for (s, got) in seqs.iter().zip(&got) {
        let model = if s.adapter.is_some() {
            &with_lora
        } else {
            base
        };
        let want = reference_logits(model, &s.ids, 1);
        let other = reference_logits(
            if s.adapter.is_some() {
                base
            } else {
                &with_lora
            },
            &s.ids,
            1,
        );
        for (pos, logits) in got {
            let diff = max_abs_diff(logits, &want[*pos]);
            assert!(
                diff < TOL,
                "adapter {:?}, position {pos}: max diff {diff}",
                s.adapter
            );
            // The adapter changes the logits, so matching the right model means something.
            assert!(max_abs_diff(logits, &other[*pos]) > 1e-3);
        }
    }
}

#[test]
fn a_too_short_block_table_is_an_error() {
    let loaded = load(&llama_dir());
    let mut cache = PagedKvCache::new(&loaded.model, 4, 4);
    let tokens = prompt(1, 6);
    let err = loaded
        .model
        .forward_paged(
            &[PagedSeq {
                tokens: &tokens,
                start: 0,
                block_table: &[0],
                adapter: None,
            }],
            &mut cache,
            &[],
        )
        .unwrap_err();
    assert!(err.to_string().contains("needs 2 blocks"), "{err}");
}
