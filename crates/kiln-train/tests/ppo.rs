//! `kiln ppo`: the algorithm's arithmetic on hand-computed numbers (GAE, whitening, the k1/k3
//! KL estimators, the clipped losses and their gradients), config errors that name the key, the
//! reference that shares the policy's weights in a LoRA run, and end to end on the fixture model:
//! PPO raises a rule reward, and runs on the synthetic world with its rule reward.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use kiln_train::finetune::FineTuneModel;
use kiln_train::metrics::read_metrics;
use kiln_train::ppo::{
    KlEstimator, PpoConfig, clipped_policy_loss, clipped_value_loss, gae, kl_estimate,
    masked_whiten, ppo, token_rewards,
};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hf")
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
}

#[test]
fn gae_matches_a_hand_computation() {
    // γ = 1, λ = 0.95: δ = [0.1 + 0.3 − 0.5, −0.2 + 0.8 − 0.3, 1.0 + 0 − 0.8] = [−0.1, 0.3, 0.2];
    // A₂ = 0.2, A₁ = 0.3 + 0.95·0.2 = 0.49, A₀ = −0.1 + 0.95·0.49 = 0.3655.
    let (adv, ret) = gae(&[0.1, -0.2, 1.0], &[0.5, 0.3, 0.8], 1.0, 0.95);
    close(&adv, &[0.3655, 0.49, 0.2]);
    close(&ret, &[0.8655, 0.79, 1.0]);
    // γ = 0.9, λ = 0.5: δ = [0.1 + 0.27 − 0.5, −0.2 + 0.72 − 0.3, 0.2] = [−0.13, 0.22, 0.2];
    // A₁ = 0.22 + 0.45·0.2 = 0.31, A₀ = −0.13 + 0.45·0.31 = 0.0095.
    let (adv, ret) = gae(&[0.1, -0.2, 1.0], &[0.5, 0.3, 0.8], 0.9, 0.5);
    close(&adv, &[0.0095, 0.31, 0.2]);
    close(&ret, &[0.5095, 0.61, 1.0]);
    // λ = 0 is one-step TD; λ = 1, γ = 1 is the return minus the value.
    let (adv, _) = gae(&[0.0, 0.0, 1.0], &[0.2, 0.4, 0.6], 1.0, 0.0);
    close(&adv, &[0.2, 0.2, 0.4]);
    let (adv, ret) = gae(&[0.0, 0.0, 1.0], &[0.2, 0.4, 0.6], 1.0, 1.0);
    close(&adv, &[0.8, 0.6, 0.4]);
    close(&ret, &[1.0, 1.0, 1.0]);
}

#[test]
fn whitening_uses_the_masked_unbiased_variance() {
    // Over [1, 2, 3] (the 100 is masked out): mean 2, unbiased variance 1.
    let w = masked_whiten(&[1.0, 2.0, 3.0, 100.0], &[true, true, true, false], true);
    close(&w, &[-1.0, 0.0, 1.0, 0.0]);
    // Without shifting the mean (TRL's whiten_rewards), the mean is added back.
    let w = masked_whiten(&[1.0, 2.0, 3.0, 100.0], &[true, true, true, false], false);
    close(&w, &[1.0, 2.0, 3.0, 0.0]);
    // [0, 4] → mean 2, unbiased variance 8: ±2/√8.
    let w = masked_whiten(&[0.0, 4.0], &[true, true], true);
    close(&w, &[-0.70710677, 0.70710677]);
    // One token has no variance: its whitened advantage is 0, not a division by zero.
    let w = masked_whiten(&[5.0, 7.0], &[true, false], true);
    close(&w, &[0.0, 0.0]);
}

#[test]
fn k1_and_k3_estimate_the_kl_as_schulman_defines_them() {
    // log π = −1, log πref = −1.5: log r = −0.5; k1 = 0.5; k3 = e^−0.5 − 1 + 0.5.
    let k1 = kl_estimate(-1.0, -1.5, KlEstimator::K1);
    let k3 = kl_estimate(-1.0, -1.5, KlEstimator::K3);
    assert!((k1 - 0.5).abs() < 1e-6, "{k1}");
    assert!((k3 - ((-0.5f32).exp() - 0.5)).abs() < 1e-6, "{k3}");
    // The policy less likely than the reference: k1 goes negative, k3 never does.
    let k1 = kl_estimate(-2.0, -1.0, KlEstimator::K1);
    let k3 = kl_estimate(-2.0, -1.0, KlEstimator::K3);
    assert!((k1 + 1.0).abs() < 1e-6, "{k1}");
    assert!((k3 - (1f32.exp() - 2.0)).abs() < 1e-5, "{k3}");
    for (lp, rlp) in [(-0.3, -2.0), (-4.0, -0.1), (-1.0, -1.0)] {
        assert!(kl_estimate(lp, rlp, KlEstimator::K3) >= 0.0);
    }
    assert_eq!(kl_estimate(-1.0, -1.0, KlEstimator::K1), 0.0);
}

#[test]
fn the_score_lands_on_the_last_token_under_the_kl_penalty() {
    let r = token_rewards(&[0.2, -0.1, 0.4], 1.5, 0.05);
    close(&r, &[-0.01, 0.005, 1.48]);
}

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

#[test]
fn clipped_policy_loss_on_hand_numbers() {
    // ρ = [1.5, 0.5, 1.1, 2.0]; A = [1, 1, −2, 5]; ε = 0.2; the last token is masked out.
    //   token 0: max(−1.5, −1.2) = −1.2 (clipped);  token 1: max(−0.5, −0.8) = −0.5;
    //   token 2: max(2.2, 2.2) = 2.2.  Loss = (−1.2 − 0.5 + 2.2) / 3.
    let new = Var::new(
        &[1.5f32.ln(), 0.5f32.ln(), 1.1f32.ln(), 2.0f32.ln()],
        &Device::Cpu,
    )
    .unwrap();
    let old = t(&[0.0; 4]);
    let (loss, clipped) = clipped_policy_loss(
        new.as_tensor(),
        &old,
        &t(&[1.0, 1.0, -2.0, 5.0]),
        &t(&[1.0, 1.0, 1.0, 0.0]),
        0.2,
        3.0,
    )
    .unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() - 0.5 / 3.0).abs() < 1e-6);
    assert_eq!(clipped, 1.0);
    // ∂/∂ log π: 0 where the clipped branch won, −A·ρ/3 elsewhere, 0 under the mask.
    let g: Vec<f32> = loss
        .backward()
        .unwrap()
        .get(new.as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    close(&g, &[0.0, -0.5 / 3.0, 2.2 / 3.0, 0.0]);
}

#[test]
fn clipped_value_loss_on_hand_numbers() {
    // v = [1, 0, 0.5, 0]; v_old = [0.5, 0.1, 0.5, 0.5]; R = [2, 0, 0, 1]; ε_v = 0.2.
    //   token 0: clip(1) = 0.7 → max(1, 1.69) = 1.69 (clipped);  token 1: 0;
    //   token 2: 0.25;  token 3: clip(0) = 0.3 → max(1, 0.49) = 1.
    //   Loss = ½ · 2.94 / 4.
    let v = Var::new(&[1.0f32, 0.0, 0.5, 0.0], &Device::Cpu).unwrap();
    let (loss, clipped) = clipped_value_loss(
        v.as_tensor(),
        &t(&[0.5, 0.1, 0.5, 0.5]),
        &t(&[2.0, 0.0, 0.0, 1.0]),
        &t(&[1.0; 4]),
        0.2,
        4.0,
    )
    .unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() - 0.3675).abs() < 1e-6);
    assert_eq!(clipped, 1.0);
    // ∂/∂v = (v − R)/4 on the unclipped branch; 0 where the clipped value won.
    let g: Vec<f32> = loss
        .backward()
        .unwrap()
        .get(v.as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    close(&g, &[0.0, 0.0, 0.125, -0.25]);
}

// ---------------------------------------------------------------------------------------------

/// Plain-text prompts the fixture's tokenizer handles.
fn prompts(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let words = [
        "The model",
        "A small cat",
        "Every request",
        "The gateway",
        "Which user",
    ];
    let rows: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({"prompt": format!("{} {i}", words[i % words.len()])}).to_string()
        })
        .collect();
    std::fs::write(&path, rows.join("\n")).unwrap();
    path
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let file = dir.join("ppo.yaml");
    std::fs::write(&file, body).unwrap();
    file
}

fn config(dir: &Path, peft: &str, args: &str, overrides: &[&str]) -> PpoConfig {
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\n{peft}training_args:\n  output_dir: {}\n  seed: 3\n{args}",
        testdata().join("llama").display(),
        prompts(dir, 16).display(),
        dir.join("out").display()
    );
    let file = write_config(dir, &yaml);
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    PpoConfig::load(&file, &overrides).unwrap()
}

const LORA: &str = "peft_config:\n  r: 8\n  lora_alpha: 16\n  target_modules: all-linear\n";

/// The keys the issue asks `metrics.jsonl` to carry, at every logged step.
const METRICS: [&str; 10] = [
    "objective/kl",
    "objective/scores",
    "policy/approxkl",
    "policy/clipfrac",
    "loss/value",
    "policy/entropy",
    "loss/policy",
    "objective/rlhf_reward",
    "objective/non_score_reward",
    "val/clipfrac",
];

/// The reward that replies starting with a lowercase letter get: about one sampled reply in five
/// from the random fixture model, so the behaviour is reachable and has room to grow.
const LOWERCASE: &str = "  reward: {regex: '^[a-z]'}\n  response_length: 4\n  max_steps: 20\n  \
     per_device_train_batch_size: 16\n  logging_steps: 5\n  save_steps: 100\n";

#[test]
fn ppo_raises_a_rule_reward() {
    for (peft, lr) in [("", 1e-3), (LORA, 1e-2)] {
        let dir = tempfile::tempdir().unwrap();
        let args = format!("{LOWERCASE}  learning_rate: {lr}\n  eval_temperature: 0.7\n");
        let cfg = config(dir.path(), peft, &args, &[]);
        let s = ppo(&cfg, false).unwrap();
        eprintln!(
            "{}: reward {:.3} -> {:.3}, {:.3} s/step, last scores {:?} kl {:?}",
            s.method,
            s.mean_reward_before,
            s.mean_reward_after,
            s.seconds_per_step,
            s.final_scores,
            s.final_kl
        );
        assert!(
            s.mean_reward_after > s.mean_reward_before + 0.25,
            "{}: {} -> {}",
            s.method,
            s.mean_reward_before,
            s.mean_reward_after
        );
        assert_eq!((s.steps, s.optimizer_steps, s.episodes), (20, 80, 320));
        let records = read_metrics(&dir.path().join("out/metrics.jsonl")).unwrap();
        assert_eq!(
            records.iter().map(|r| r.step).collect::<Vec<_>>(),
            [5, 10, 15, 20]
        );
        for r in &records {
            for key in METRICS {
                assert!(
                    r.extra.get(key).is_some_and(|v| v.is_finite()),
                    "{key} at {}",
                    r.step
                );
            }
        }
        // The rollouts' own reward rises too, and the policy pays for it in KL.
        let scores = |r: &kiln_train::metrics::MetricsRecord| r.extra["objective/scores"];
        assert!(scores(&records[3]) > scores(&records[0]), "{records:?}");
        assert!(records[3].extra["objective/kl"] > 0.0);
        let saved = if peft.is_empty() {
            "model.safetensors"
        } else {
            "adapter_model.safetensors"
        };
        assert!(dir.path().join("out").join(saved).exists());
        assert!(dir.path().join("out/train_results.json").exists());
    }
}

#[test]
fn greedy_before_and_after_agree_without_training_and_the_first_ratio_is_one() {
    // Dropout configured, micro-batches of 2 where rollouts scored 8 at once: the first PPO
    // epoch must still see the log-probabilities the rollout saw (ratio 1, no clipping).
    let dir = tempfile::tempdir().unwrap();
    let peft = "peft_config:\n  r: 4\n  lora_alpha: 8\n  lora_dropout: 0.3\n  target_modules: all-linear\n";
    let cfg = config(
        dir.path(),
        peft,
        "  reward: {regex: '^[a-z]'}\n  response_length: 6\n  max_steps: 1\n  num_ppo_epochs: 1\n  \
         per_device_train_batch_size: 2\n  gradient_accumulation_steps: 4\n  logging_steps: 1\n  \
         learning_rate: 1e-9\n",
        &[],
    );
    let s = ppo(&cfg, false).unwrap();
    let r = &read_metrics(&dir.path().join("out/metrics.jsonl")).unwrap()[0];
    assert!((r.extra["val/ratio"] - 1.0).abs() < 1e-4, "{r:?}");
    assert!(r.extra["policy/approxkl"] < 1e-8, "{r:?}");
    assert_eq!(r.extra["policy/clipfrac"], 0.0);
    // Policy = reference at the first rollout: no KL.
    assert!(r.extra["objective/kl"].abs() < 1e-4, "{r:?}");
    // A learning rate of 1e-9 changes no greedy reply: the same measurement gives the same mean.
    assert_eq!(s.mean_reward_before, s.mean_reward_after);
    assert_eq!(s.eval_temperature, 0.0);
}

/// Data pointers of a tensor's storage: equal means one allocation.
fn storage_addr(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    std::ptr::from_ref(&*storage).addr()
}

#[test]
fn the_lora_reference_is_the_policys_own_weights_and_a_full_run_gets_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), LORA, "  reward: {regex: a}\n", &[]);
    let policy = FineTuneModel::load(&cfg).unwrap();
    let reference = policy.reference(&cfg).unwrap().0;
    assert!(policy.model.has_adapters() && !reference.has_adapters());
    let (p, r) = (
        policy.model.state_dict().unwrap(),
        reference.state_dict().unwrap(),
    );
    assert_eq!(p.len(), r.len());
    for ((pn, pt), (rn, rt)) in p.iter().zip(&r) {
        assert_eq!(pn, rn);
        assert_eq!(pt.id(), rt.id(), "{pn}: the reference holds another tensor");
        assert_eq!(
            storage_addr(pt),
            storage_addr(rt),
            "{pn}: the reference copied the weights"
        );
    }

    // Full fine-tuning trains every weight in place: the reference must be its own frozen copy.
    let cfg = config(dir.path(), "", "  reward: {regex: a}\n", &[]);
    let policy = FineTuneModel::load(&cfg).unwrap();
    let reference = policy.reference(&cfg).unwrap().0;
    for ((name, pt), (_, rt)) in policy
        .model
        .state_dict()
        .unwrap()
        .iter()
        .zip(&reference.state_dict().unwrap())
    {
        assert_ne!(
            storage_addr(pt),
            storage_addr(rt),
            "{name} is shared with the trained policy"
        );
    }
}

/// The error `ppo` gives for the config with `args` under `training_args` (loading, validation
/// or the run's own checks, whichever fails first).
fn error_for(args: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\ntraining_args:\n  output_dir: {}\n{args}",
        testdata().join("llama").display(),
        prompts(dir.path(), 4).display(),
        dir.path().join("out").display()
    );
    let file = write_config(dir.path(), &yaml);
    match PpoConfig::load(&file, &[]) {
        Err(e) => e.to_string(),
        Ok(cfg) => ppo(&cfg, false).expect_err(args).to_string(),
    }
}

#[test]
fn config_errors_name_the_key() {
    let world = tempfile::tempdir().unwrap();
    kiln_data::write_world(world.path(), &kiln_data::SynthOptions::sized(true, 0)).unwrap();
    let world_json = world.path().join("world.json");
    let cases = [
        ("", "training_args.reward"),
        ("  reward: {regex: '('}\n", "training_args.reward.regex"),
        (
            "  reward: {rule: world}\n",
            "training_args.reward.world_path",
        ),
        (
            "  reward: {rule: moon, world_path: w.json}\n",
            "training_args.reward.rule",
        ),
        ("  reward: {regex: a, exact: [b]}\n", "exactly one of"),
        ("  reward: {regx: a}\n", "training_args.reward.regx"),
        ("  reward: {exact: []}\n", "training_args.reward.exact"),
        (
            "  reward: {regex: a, world_path: w.json}\n",
            "training_args.reward.world_path",
        ),
        ("  reward: [a]\n", "training_args.reward"),
        (
            "  reward: {regex: a}\n  reward_model_path: /nowhere\n",
            "not both",
        ),
        (
            "  reward: {rule: world, world_path: /no/world.json}\n",
            "training_args.reward.world_path",
        ),
        (
            "  reward_model_path: REPLACE_MODEL\n",
            "training_args.reward_model_path",
        ),
        (
            "  reward: {regex: a}\n  kl_estimator: k2\n",
            "training_args.kl_estimator",
        ),
        (
            "  reward: {regex: a}\n  cliprange: -0.1\n",
            "training_args.cliprange",
        ),
        (
            "  reward: {regex: a}\n  temperature: 0\n",
            "training_args.temperature",
        ),
        ("  reward: {regex: a}\n  lam: 1.5\n", "training_args.lam"),
        (
            "  reward: {regex: a}\n  num_ppo_epochs: 0\n",
            "training_args.num_ppo_epochs",
        ),
        ("  reward: {regex: a}\n  kl_coeff: 0.1\n", "kl_coeff"),
        (
            "  reward: {regex: a}\n  response_length: 64\n  max_length: 32\n",
            "training_args.max_length",
        ),
        (
            // Plain prompts carry no task or answer for the world's rules to check.
            "  reward: {rule: world, world_path: REPLACE_WORLD}\n",
            "prompts.jsonl:1",
        ),
    ];
    for (args, want) in cases {
        let args = args
            .replace(
                "REPLACE_MODEL",
                &testdata().join("llama").display().to_string(),
            )
            .replace("REPLACE_WORLD", &world_json.display().to_string());
        let e = error_for(&args);
        assert!(e.contains(want), "{args:?}: expected `{want}` in: {e}");
    }
}

#[test]
fn ppo_runs_on_the_synthetic_world_with_its_rule_reward() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("world");
    let written = kiln_data::write_world(&data, &kiln_data::SynthOptions::sized(true, 0)).unwrap();
    let world = kiln_data::World::read(&data.join("world.json")).unwrap();
    let yaml = format!(
        "model_id: {}\ndataset_path: {}\neval_split: 0.1\n{LORA}training_args:\n  output_dir: {}\n  \
         reward: {{rule: world, world_path: {}}}\n  per_device_train_batch_size: 4\n  \
         max_steps: 2\n  response_length: 8\n  logging_steps: 1\n  learning_rate: 0.001\n",
        testdata().join("llama").display(),
        data.join("rl/prompts.jsonl").display(),
        dir.path().join("out").display(),
        data.join("world.json").display()
    );
    let cfg = PpoConfig::load(&write_config(dir.path(), &yaml), &[]).unwrap();
    let s = ppo(&cfg, false).unwrap();
    let rl_rows = written
        .files
        .iter()
        .find(|f| f.name == "rl/prompts.jsonl")
        .unwrap()
        .rows
        .unwrap();
    assert!(s.eval_held_out);
    assert_eq!(s.eval_prompts + s.train_prompts, rl_rows);
    assert_eq!(s.eval_prompts, (rl_rows as f64 * 0.1).round() as usize);
    assert_eq!(s.reward, "rule: world");
    for r in [s.mean_reward_before, s.mean_reward_after] {
        assert!((-1.0..=1.0).contains(&r), "{s:?}");
    }
    let records = read_metrics(&dir.path().join("out/metrics.jsonl")).unwrap();
    assert_eq!(records.len(), 2);
    for key in METRICS {
        assert!(records[1].extra.contains_key(key), "{key}");
    }
    assert!(dir.path().join("out/adapter_config.json").exists());

    // The prompts are the lifecycle's conversations: the world's system prompt, the question,
    // and the assistant's turn opened.
    let tokenizer = kiln_core::Tokenizer::from_dir(&testdata().join("llama")).unwrap();
    let rule = kiln_train::ppo_reward::WorldRule {
        world: world.clone(),
    };
    let prompts = kiln_train::ppo::load_prompts(
        &data.join("rl/prompts.jsonl"),
        &tokenizer,
        Some(&world.system_prompt()),
        &rule,
    )
    .unwrap();
    let text = tokenizer.decode(&prompts[0].ids, false).unwrap();
    let question = prompts[0].row["prompt"].as_str().unwrap();
    assert!(
        text.starts_with(&format!(
            "<|im_start|>system\n{}<|im_end|>",
            world.system_prompt()
        )) && text.contains(question)
            && text.ends_with("<|im_start|>assistant\n"),
        "{text}"
    );
}

#[test]
fn a_reward_model_scores_prompt_and_response_and_drives_ppo() {
    use kiln_train::ppo_reward::{ModelReward, RewardFn, Rollout};
    let dir = tempfile::tempdir().unwrap();
    let lm = kiln_model::LoadedModel::load(
        testdata().join("llama").to_str().unwrap(),
        &kiln_model::LoadOptions::default(),
    )
    .unwrap();
    let rm = kiln_model::reward::RewardModel::from_causal_lm(lm.model, 0.02, 7).unwrap();
    let rm_dir = dir.path().join("rm");
    rm.save(&testdata().join("llama"), &rm_dir).unwrap();

    // The score is the reward model's on prompt ⧺ response, EOS included.
    let reward = ModelReward::load(&rm_dir).unwrap();
    let row = serde_json::json!({"prompt": "The model"});
    let rollout = Rollout {
        row: &row,
        prompt_ids: &[0, 407, 404],
        response_ids: &[385, 288, 3],
        reply: " learns and",
    };
    let got = reward.score(&[rollout, rollout]).unwrap();
    let want = rm.score_rows(&[vec![0, 407, 404, 385, 288, 3]]).unwrap();
    close(&got, &[want[0], want[0]]);

    let args = format!(
        "  reward_model_path: {}\n  max_steps: 2\n  per_device_train_batch_size: 4\n  \
         response_length: 4\n  logging_steps: 1\n",
        rm_dir.display()
    );
    let s = ppo(&config(dir.path(), LORA, &args, &[]), false).unwrap();
    assert!(s.reward.starts_with("reward model"), "{}", s.reward);
    assert!(s.final_scores.is_some_and(f64::is_finite));
    // A random head gives a nonzero, finite score to the greedy replies.
    assert!(s.mean_reward_before.is_finite() && s.mean_reward_before != 0.0);
}
