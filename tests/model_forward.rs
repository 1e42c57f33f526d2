//! The two forward paths agree, on ragged batches, with GQA and tied heads, and through cache
//! forks; autodiff gradients match finite differences.

use burn::backend::{Autodiff, Flex};
use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use mrt::model::{last_logits, token_logprobs, KvCache, Transformer, TransformerConfig};

type B = Flex;

fn config(n_kv_heads: usize, tie: bool) -> TransformerConfig {
    TransformerConfig {
        vocab_size: 37,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads,
        d_ff: 48,
        max_seq_len: 64,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: tie,
        qkv_bias: false,
    }
}

/// Right-padded `[rows, width]` ids; padding uses `pad`.
fn padded(rows: &[Vec<u32>], width: usize, pad: u32) -> Tensor<B, 2, Int> {
    let tok: Vec<i64> = rows
        .iter()
        .flat_map(|r| (0..width).map(move |i| *r.get(i).unwrap_or(&pad) as i64))
        .collect();
    Tensor::from_data(TensorData::new(tok, [rows.len(), width]), &Default::default())
}

fn ids(rows: &[Vec<u32>], width: usize) -> (Tensor<B, 2, Int>, ()) {
    (padded(rows, width, 0), ())
}

fn max_abs_diff(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// Full-forward logits at position `pos` of each row.
fn full_logits_at(model: &Transformer<B>, rows: &[Vec<u32>], pos: &[usize]) -> Tensor<B, 2> {
    let width = rows.iter().map(|r| r.len()).max().unwrap();
    let logits = model.forward(padded(rows, width, 0));
    last_logits(logits, &pos.iter().map(|p| p + 1).collect::<Vec<_>>())
}

/// Prefill ragged prompts, then append ragged chunks and single tokens; after each call the
/// cached logits of each row's last token equal the full forward's at that position.
fn check_cached_equals_full(cfg: &TransformerConfig) {
    let dev = Default::default();
    let model = Transformer::<B>::new(cfg, 7, &dev).unwrap();
    let mut rows: Vec<Vec<u32>> = vec![vec![1, 5, 9, 2, 3], vec![4, 8], vec![7, 7, 1]];
    let (tok, _) = ids(&rows, 5);
    let mut cache: KvCache<B> = model.new_cache(3, 40);
    let counts: Vec<usize> = rows.iter().map(|r| r.len()).collect();
    let cached = last_logits(model.forward_cached(tok, &mut cache, Some(&counts)).unwrap(), &counts);
    let lens: Vec<usize> = rows.iter().map(|r| r.len() - 1).collect();
    let d = max_abs_diff(cached, full_logits_at(&model, &rows, &lens));
    assert!(d < 1e-4, "prefill differs by {d}");

    // Ragged chunk (row 1 appends nothing: a hole), then three single-token steps.
    let chunks: Vec<Vec<u32>> = vec![vec![11, 12], vec![], vec![13]];
    let (tok, _) = ids(&chunks, 2);
    let counts: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
    let logits = model.forward_cached(tok, &mut cache, Some(&counts)).unwrap();
    for (r, c) in rows.iter_mut().zip(&chunks) {
        r.extend(c);
    }
    assert_eq!(cache.lengths(), &[7, 2, 4]);
    let pick: Vec<usize> = counts.iter().map(|&c| c.max(1)).collect();
    let cached = last_logits(logits, &pick);
    let lens: Vec<usize> = rows.iter().map(|r| r.len() - 1).collect();
    let cached_rows = cached.clone().select(0, Tensor::from_data([0i64, 2], &dev));
    let full_rows = full_logits_at(&model, &rows, &lens).select(0, Tensor::from_data([0i64, 2], &dev));
    let d = max_abs_diff(cached_rows, full_rows);
    assert!(d < 1e-4, "ragged chunk differs by {d}");

    for step in 0..3u32 {
        let next: Vec<Vec<u32>> = (0..3).map(|r| vec![(step * 3 + r + 14) % 37]).collect();
        let (tok, _) = ids(&next, 1);
        let logits = model.forward_cached(tok, &mut cache, None).unwrap();
        for (r, n) in rows.iter_mut().zip(&next) {
            r.extend(n);
        }
        let cached = last_logits(logits, &[1, 1, 1]);
        let lens: Vec<usize> = rows.iter().map(|r| r.len() - 1).collect();
        let d = max_abs_diff(cached, full_logits_at(&model, &rows, &lens));
        assert!(d < 1e-4, "decode step {step} differs by {d}");
    }
    assert_eq!(cache.slots(), 5 + 2 + 3);
}

#[test]
fn right_padding_does_not_change_the_logits_of_real_tokens() {
    let model = Transformer::<B>::new(&config(2, false), 9, &Default::default()).unwrap();
    let rows: Vec<Vec<u32>> = vec![vec![3, 1, 4, 1, 5, 9], vec![2, 7], vec![1, 8, 2, 8]];
    let a = model.forward(padded(&rows, 6, 0));
    let b = model.forward(padded(&rows, 6, 33));
    for (r, row) in rows.iter().enumerate() {
        let n = row.len();
        let pa = a.clone().slice([r..r + 1, 0..n]).reshape([n, 37]);
        let pb = b.clone().slice([r..r + 1, 0..n]).reshape([n, 37]);
        assert_eq!(max_abs_diff(pa, pb), 0.0, "row {r}");
    }
    // The padded positions themselves do change, so the comparison above is not vacuous.
    let pa = a.slice([1..2, 2..6]).reshape([4, 37]);
    let pb = b.slice([1..2, 2..6]).reshape([4, 37]);
    assert!(max_abs_diff(pa, pb) > 1e-3);
}

#[test]
fn cached_decoding_matches_full_forward_on_ragged_batch() {
    check_cached_equals_full(&config(4, false));
}

#[test]
fn gqa_and_tied_head_configs_run_and_agree() {
    check_cached_equals_full(&config(2, false));
    check_cached_equals_full(&config(1, true));
    let model = Transformer::<B>::new(&config(2, true), 1, &Default::default()).unwrap();
    assert!(model.head.is_none());
    assert_eq!(model.num_params(), config(2, true).num_params());
    let model = Transformer::<B>::new(&config(2, false), 1, &Default::default()).unwrap();
    assert_eq!(model.num_params(), config(2, false).num_params());
}

/// The forward that runs the output head on each row's last token only (what decoding samples
/// from) gives the full chunk's logits there, fills the cache the same way, and a row that fed
/// nothing (count 0) gets position 0's like `last_logits` with `max(1)`.
#[test]
fn last_token_forward_equals_the_chunks_last_logits() {
    for cfg in [config(2, false), config(1, true)] {
        let model = Transformer::<B>::new(&cfg, 5, &Default::default()).unwrap();
        let mut full: KvCache<B> = model.new_cache(3, 24);
        let mut last: KvCache<B> = model.new_cache(3, 24);
        let prompts: Vec<Vec<u32>> = vec![vec![1, 5, 9, 2, 3], vec![4, 8], vec![7, 7, 1]];
        let chunks: Vec<Vec<u32>> = vec![vec![11, 12], vec![], vec![13]];
        let steps = [(prompts, 5), (chunks, 2), (vec![vec![14], vec![15], vec![16]], 1)];
        for (rows, width) in steps {
            let counts: Vec<usize> = rows.iter().map(|r| r.len()).collect();
            let want = model
                .forward_cached(padded(&rows, width, 0), &mut full, Some(&counts))
                .unwrap();
            let want = last_logits(want, &counts.iter().map(|&c| c.max(1)).collect::<Vec<_>>());
            let got = model
                .forward_cached_last(padded(&rows, width, 0), &mut last, Some(&counts))
                .unwrap();
            assert_eq!(got.dims(), [3, 37]);
            let d = max_abs_diff(got, want);
            assert!(d < 1e-5, "width {width}: {d}");
            assert_eq!(full.lengths(), last.lengths());
        }
        let (tok, _) = ids(&[vec![2, 3], vec![4, 5], vec![6, 7]], 2);
        let want = last_logits(model.forward_cached(tok.clone(), &mut full, None).unwrap(), &[2; 3]);
        let d = max_abs_diff(model.forward_cached_last(tok, &mut last, None).unwrap(), want);
        assert!(d < 1e-5, "without counts: {d}");
    }
}

#[test]
fn forked_and_replicated_cache_rows_continue_like_recomputation() {
    let dev = Default::default();
    let cfg = config(2, false);
    let model = Transformer::<B>::new(&cfg, 3, &dev).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4], vec![5, 6]];
    let (tok, _) = ids(&prompts, 4);
    let mut cache = model.new_cache(2, 16);
    model.forward_cached(tok, &mut cache, Some(&[4, 2])).unwrap();
    // Rows [1, 1, 0, 1]: a fork with repeats; then each forked row appends a different token.
    let mut fork = cache.select_rows(&[1, 1, 0, 1]);
    assert_eq!(fork.lengths(), &[2, 2, 4, 2]);
    let next: Vec<Vec<u32>> = vec![vec![9], vec![10], vec![11], vec![12]];
    let (tok, _) = ids(&next, 1);
    let cached = last_logits(model.forward_cached(tok, &mut fork, None).unwrap(), &[1; 4]);
    let full_rows: Vec<Vec<u32>> = vec![vec![5, 6, 9], vec![5, 6, 10], vec![1, 2, 3, 4, 11], vec![5, 6, 12]];
    let lens: Vec<usize> = full_rows.iter().map(|r| r.len() - 1).collect();
    let d = max_abs_diff(cached, full_logits_at(&model, &full_rows, &lens));
    assert!(d < 1e-4, "fork differs by {d}");

    let rep = cache.replicate(3);
    assert_eq!(rep.rows(), 6);
    assert_eq!(rep.lengths(), &[4, 4, 4, 2, 2, 2]);
}

/// A tree of continuations per row in one pass: every tree token's logits equal the full
/// forward of its path (prefix, ancestors, itself), for ragged prefixes and trees of different
/// sizes (holes), with grouped-query heads; the cache grows to hold the trees.
#[test]
fn tree_chunks_score_every_branch_like_its_own_sequence() {
    let dev = Default::default();
    let model = Transformer::<B>::new(&config(2, false), 5, &dev).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4, 5], vec![6, 7]];
    let mut cache = model.new_cache(2, 64);
    model
        .forward_cached(padded(&prompts, 5, 0), &mut cache, Some(&[5, 2]))
        .unwrap();
    // Row 0: 8 ─┬─ 9 ─── 10        Row 1: 11 ─ 12
    //           └─ 12 ─┬─ 13              13
    //                  └─ 14
    // and 15 directly after the prefix.
    let tokens: Vec<Vec<u32>> = vec![vec![8, 9, 12, 10, 13, 14, 15], vec![11, 13, 12]];
    let parents: Vec<Vec<Option<usize>>> = vec![
        vec![None, Some(0), Some(0), Some(1), Some(2), Some(2), None],
        vec![None, None, Some(0)],
    ];
    let logits = model.forward_tree(padded(&tokens, 7, 0), &parents, &mut cache).unwrap();
    let v = model.config.vocab_size;
    for (b, tree) in parents.iter().enumerate() {
        for i in 0..tree.len() {
            let mut path = vec![tokens[b][i]];
            let mut node = tree[i];
            while let Some(n) = node {
                path.insert(0, tokens[b][n]);
                node = tree[n];
            }
            let full: Vec<u32> = prompts[b].iter().copied().chain(path).collect();
            let want = full_logits_at(&model, std::slice::from_ref(&full), &[full.len() - 1]);
            let got = logits.clone().slice([b..b + 1, i..i + 1, 0..v]).reshape([1, v]);
            let d = max_abs_diff(got, want);
            assert!(d < 1e-4, "row {b}, tree token {i}: differs by {d}");
        }
    }
}

#[test]
fn malformed_trees_are_errors_not_panics() {
    let dev = Default::default();
    let model = Transformer::<B>::new(&config(4, false), 3, &dev).unwrap();
    let mut cache = model.new_cache(1, 16);
    let (tok, _) = ids(&[vec![1, 2]], 2);
    let err = model
        .forward_tree(tok.clone(), &[vec![Some(1), None]], &mut cache)
        .unwrap_err();
    assert!(err.to_string().contains("does not come before it"), "{err}");
    let err = model.forward_tree(tok, &[vec![None]], &mut cache).unwrap_err();
    assert!(err.to_string().contains("width 2"), "{err}");
}

#[test]
fn grown_and_concatenated_caches_continue_like_recomputation() {
    let dev = Default::default();
    let model = Transformer::<B>::new(&config(2, false), 4, &dev).unwrap();
    let rows: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4, 5, 6, 7, 8]];
    let (tok, _) = ids(&rows, 5);
    let mut cache = model.new_cache(2, 6);
    model.forward_cached(tok, &mut cache, Some(&[3, 5])).unwrap();
    let a = cache.select_rows(&[0]);
    // One more token in row 1 only, in a second cache that then grows past its capacity.
    let mut b = cache.select_rows(&[1]);
    let (tok, _) = ids(&[vec![9]], 1);
    model.forward_cached(tok, &mut b, None).unwrap();
    b.ensure_capacity(4);
    assert!(b.capacity() >= 10 && b.slots() == 6);
    // Stacked: the caches were made at different steps (5 and 6 slots used).
    let mut both = KvCache::cat(vec![a, b]);
    assert_eq!(both.lengths(), &[3, 6]);
    let next: Vec<Vec<u32>> = vec![vec![10], vec![11]];
    let (tok, _) = ids(&next, 1);
    let cached = last_logits(model.forward_cached(tok, &mut both, None).unwrap(), &[1, 1]);
    let full_rows: Vec<Vec<u32>> = vec![vec![1, 2, 3, 10], vec![4, 5, 6, 7, 8, 9, 11]];
    let lens: Vec<usize> = full_rows.iter().map(|r| r.len() - 1).collect();
    let d = max_abs_diff(cached, full_logits_at(&model, &full_rows, &lens));
    assert!(d < 1e-4, "grown/concatenated cache differs by {d}");
}

/// Feeds one token per row and returns the logits of that token, `[rows, V]`.
fn step(model: &Transformer<B>, cache: &mut KvCache<B>, tokens: &[u32]) -> Tensor<B, 2> {
    let next: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
    let (tok, _) = ids(&next, 1);
    last_logits(model.forward_cached(tok, cache, None).unwrap(), &vec![1; tokens.len()])
}

#[test]
fn long_decoding_across_cache_growth_matches_full_forward() {
    let model = Transformer::<B>::new(&config(2, false), 5, &Default::default()).unwrap();
    let mut rows: Vec<Vec<u32>> = vec![vec![1, 5, 9, 2, 3], vec![4, 8]];
    let (tok, _) = ids(&rows, 5);
    let mut cache = model.new_cache(2, 64);
    model.forward_cached(tok, &mut cache, Some(&[5, 2])).unwrap();
    // 50 single-token steps: the buffers grow several times on the way from 5 to 55 slots.
    for t in 0..50u32 {
        let next = [(t * 7 + 3) % 37, (t * 11 + 1) % 37];
        let cached = step(&model, &mut cache, &next);
        for (r, &n) in rows.iter_mut().zip(&next) {
            r.push(n);
        }
        if t % 7 == 0 || t == 49 {
            let lens: Vec<usize> = rows.iter().map(|r| r.len() - 1).collect();
            let d = max_abs_diff(cached, full_logits_at(&model, &rows, &lens));
            assert!(d < 1e-4, "step {t} differs by {d}");
        }
    }
    assert_eq!((cache.slots(), cache.capacity()), (55, 64));
    assert_eq!(cache.lengths(), &[55, 52]);
}

#[test]
fn in_place_cache_writes_equal_copying_writes_and_never_touch_a_shared_fork() {
    let model = Transformer::<B>::new(&config(2, false), 6, &Default::default()).unwrap();
    let prompt: Vec<Vec<u32>> = vec![vec![3, 1, 4, 1], vec![5, 9]];
    let (tok, _) = ids(&prompt, 4);
    let mut own = model.new_cache(2, 32);
    model.forward_cached(tok, &mut own, Some(&[4, 2])).unwrap();
    // `shared` and `twin` hold the same buffers, so the first of them to write must copy;
    // `own` holds its buffers alone and is written in place. All three must behave like
    // separate caches.
    let mut shared = own.select_rows(&[0, 1]);
    let mut twin = shared.clone();
    let a = step(&model, &mut own, &[9, 10]);
    let b = step(&model, &mut shared, &[9, 10]);
    assert_eq!(max_abs_diff(a, b), 0.0, "in-place and copying writes differ");
    // The twin writes the same slot with other tokens; `shared` must not see them.
    let t = step(&model, &mut twin, &[20, 21]);
    let a = step(&model, &mut own, &[11, 12]);
    let b = step(&model, &mut shared, &[11, 12]);
    assert_eq!(max_abs_diff(a, b.clone()), 0.0, "in-place and copying writes differ");
    let rows: Vec<Vec<u32>> = vec![vec![3, 1, 4, 1, 9, 11], vec![5, 9, 10, 12]];
    let d = max_abs_diff(b, full_logits_at(&model, &rows, &[5, 3]));
    assert!(d < 1e-4, "fork was overwritten: differs by {d}");
    let rows: Vec<Vec<u32>> = vec![vec![3, 1, 4, 1, 20], vec![5, 9, 21]];
    let d = max_abs_diff(t, full_logits_at(&model, &rows, &[4, 2]));
    assert!(d < 1e-4, "twin differs by {d}");
}

#[test]
fn cache_overflow_is_an_error_not_a_panic() {
    let dev = Default::default();
    let model = Transformer::<B>::new(&config(4, false), 3, &dev).unwrap();
    let mut cache = model.new_cache(1, 3);
    let (tok, _) = ids(&[vec![1, 2, 3, 4]], 4);
    let err = model.forward_cached(tok, &mut cache, None).unwrap_err();
    assert!(err.to_string().contains("KV cache full"), "{err}");
}

/// Sum of the log-probs of a fixed ragged batch, as a host number.
fn logprob_sum<Bk: Backend>(model: &Transformer<Bk>) -> Tensor<Bk, 1> {
    let dev = model.device();
    let tok = Tensor::<Bk, 2, Int>::from_data([[1i64, 4, 9, 16, 25], [3, 6, 12, 0, 0]], &dev);
    let loss_mask = Tensor::<Bk, 2>::from_data([[1.0f32, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], &dev);
    token_logprobs(model, tok, Some(loss_mask), false, 1.0).logprobs.sum()
}

/// Multiplies every matrix parameter by a constant.
struct Scale(f32);

impl<Bk: Backend> ModuleMapper<Bk> for Scale {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        if D == 2 {
            let s = self.0;
            param.map(|t| t * s)
        } else {
            param
        }
    }
}

/// Marks every parameter as trainable (moving a module onto autodiff does not).
struct RequireGrad;

impl<Bk: Backend> ModuleMapper<Bk> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        param.set_require_grad(true)
    }
}

#[test]
fn autodiff_gradients_match_finite_differences() {
    type AD = Autodiff<Flex>;
    let dev = Default::default();
    let cfg = TransformerConfig {
        vocab_size: 29,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        d_ff: 24,
        max_seq_len: 16,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        qkv_bias: false,
    };
    // Weights 6× the default init scale: attention is then far from uniform and every
    // gradient is large enough to stand out of f32 rounding in a finite difference.
    let inner = Transformer::<B>::new(&cfg, 11, &dev).unwrap().map(&mut Scale(6.0));
    let model: Transformer<AD> = inner.clone().train::<AD>().map(&mut RequireGrad);
    let grads = logprob_sum(&model).backward();

    // (name, getter of the autodiff param, setter on the inner model)
    type Get = fn(&Transformer<AD>) -> &Param<Tensor<AD, 2>>;
    type GetInner = fn(&mut Transformer<B>) -> &mut Param<Tensor<B, 2>>;
    let params: [(&str, Get, GetInner); 6] = [
        ("q", |m| &m.blocks[0].attn.q.weight, |m| &mut m.blocks[0].attn.q.weight),
        ("k", |m| &m.blocks[1].attn.k.weight, |m| &mut m.blocks[1].attn.k.weight),
        ("v", |m| &m.blocks[0].attn.v.weight, |m| &mut m.blocks[0].attn.v.weight),
        (
            "gate",
            |m| &m.blocks[1].mlp.gate.weight,
            |m| &mut m.blocks[1].mlp.gate.weight,
        ),
        ("embed", |m| &m.embed.weight, |m| &mut m.embed.weight),
        (
            "head",
            |m| &m.head.as_ref().unwrap().weight,
            |m| &mut m.head.as_mut().unwrap().weight,
        ),
    ];
    let eps = 2e-3f32;
    let mut checked = 0;
    for (name, get, get_inner) in params {
        let p = get(&model);
        let grad = p.val().grad(&grads).expect("parameter has a gradient");
        let [rows, cols] = grad.dims();
        let g: Vec<f32> = grad.into_data().to_vec().unwrap();
        // The three entries with the largest gradient (best signal-to-rounding ratio).
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &flat in order.iter().take(3) {
            let (i, j) = (flat / cols, flat % cols);
            let value = |delta: f32| {
                let mut m = inner.clone();
                let param = get_inner(&mut m);
                let bump = Tensor::<B, 2>::zeros([rows, cols], &dev)
                    .slice_assign([i..i + 1, j..j + 1], Tensor::full([1, 1], delta, &dev));
                *param = Param::from_tensor(param.val() + bump);
                logprob_sum(&m).into_scalar() as f64
            };
            let numeric = (value(eps) - value(-eps)) / (2.0 * eps as f64);
            let analytic = g[flat] as f64;
            let rel = (numeric - analytic).abs() / analytic.abs().max(1e-2);
            assert!(
                rel < 2e-2,
                "{name}[{i},{j}]: autodiff {analytic:.5} vs finite difference {numeric:.5}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
}
