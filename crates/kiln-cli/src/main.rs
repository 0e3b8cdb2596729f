//! `kiln`: one binary for a language model's whole life: loading and scoring Hugging Face
//! checkpoints, pre-training, fine-tuning, alignment, quantization and GGUF export, serving, the
//! gateway in front of it with its guardrails, and the `lifecycle` command that runs them all end
//! to end.

mod bench;
mod data;
#[cfg(test)]
mod deploy_check;
mod dpo;
mod eval;
mod eval_logps;
mod eval_reward;
mod export;
mod feedback;
mod gateway;
mod generate;
mod guard;
mod healthcheck;
mod info;
mod lifecycle;
mod lifecycle_deploy;
mod lifecycle_gateway;
mod lifecycle_guard;
mod lifecycle_loop;
mod lifecycle_monitor;
mod lifecycle_quantize;
mod lifecycle_serve;
mod loop_cmd;
mod loop_eval;
mod merge;
mod model_args;
mod models;
mod monitor;
mod monitor_drift;
mod ppo;
mod pretrain;
mod quantize;
mod reward;
mod serve;
mod sft;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Training and prefill allocate and free many large tensors per step; glibc's allocator hands
/// those back to the kernel and pays a page fault per 4 KiB page to get them again (measured:
/// a third of a pre-training step). mimalloc, told never to purge, keeps them for reuse — the
/// same trade PyTorch's caching allocator makes: peak memory stays reserved.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3): the 16th entry of `mi_option_e`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option by value; runs first thing in `main`, before
    // any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[derive(Parser)]
#[command(name = "kiln", version, about = "Pre-train, fine-tune, align, quantize and serve language models", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// kiln's main job: every stage end to end on the built-in synthetic world, with a report.
    Lifecycle(lifecycle::LifecycleArgs),
    /// Datasets: the built-in synthetic world.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Benchmarks of a running system: `kiln bench serve` load-tests an OpenAI-compatible server.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Generate text from a prompt.
    Generate(generate::GenerateArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Quantize a model to 4 or 8 bits with RTN, GPTQ or AWQ (a GPTQ or AWQ checkpoint).
    Quantize(quantize::QuantizeArgs),
    /// Export a model to another format: `kiln export gguf` for llama.cpp and Ollama.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Describe a model: architecture, parameters, dtype, context length.
    Info(info::InfoArgs),
    /// Merge a LoRA adapter into its base model and save a plain model directory.
    Merge(merge::MergeArgs),
    /// Pre-train a Llama from scratch on a text corpus.
    Pretrain(pretrain::PretrainArgs),
    /// Supervised fine-tuning with LoRA (PEFT-compatible adapters) or in full, from TRL-style YAML.
    Sft(sft::SftArgs),
    /// Train a reward model (a sequence classifier) on preference pairs.
    Reward(reward::RewardArgs),
    /// Direct preference optimization on preference pairs, with TRL's DPOTrainer semantics.
    Dpo(dpo::DpoArgs),
    /// RLHF with PPO against a reward model or a rule reward.
    Ppo(ppo::PpoArgs),
    /// A working local stack in one command: the inference service and the gateway in one
    /// process, with a dev API key, the dashboard and traces in SQLite.
    Up(up::UpArgs),
    /// Serve a model and its LoRA adapters over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// An API gateway in front of OpenAI-compatible upstreams: auth, rate limits, validation,
    /// guardrails, a response cache and cost metering.
    Gateway(gateway::GatewayArgs),
    /// Guardrails: train and evaluate the guard classifier (benign, injection, toxic,
    /// pii_request), and scan a text with every detector.
    #[command(subcommand)]
    Guard(guard::GuardCommand),
    /// Monitoring offline: drift between two windows of traffic, the trace store as JSONL, cost
    /// per token by model, tenant and day, and the hallucination flag's calibration.
    #[command(subcommand)]
    Monitor(monitor::MonitorCommand),
    /// The feedback loop's data: `kiln feedback export` turns the gateway's stored feedback into
    /// DPO, KTO or SFT training rows.
    #[command(subcommand)]
    Feedback(feedback::FeedbackCommand),
    /// One round of the feedback loop: export feedback, DPO a candidate from the serving model,
    /// evaluate it against the serving model, and promote it into the running server (or not).
    Loop(loop_cmd::LoopArgs),
    /// The model registry: every round of `kiln loop`, with its data, metrics and decision.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Exit 0 when a URL (a service's /live or /ready) answers 2xx: the container HEALTHCHECK.
    Healthcheck(healthcheck::HealthcheckArgs),
}

fn main() -> ExitCode {
    keep_freed_memory();
    kiln_core::init_cpu_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lifecycle(args) => lifecycle::run(args),
        Command::Data(cmd) => data::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Generate(args) => generate::run(args),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Export(cmd) => export::run(cmd),
        Command::Quantize(args) => quantize::run(args),
        Command::Info(args) => info::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Sft(args) => sft::run(args),
        Command::Reward(args) => reward::run(args),
        Command::Dpo(args) => dpo::run(args),
        Command::Ppo(args) => ppo::run(args),
        Command::Up(args) => up::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Gateway(args) => gateway::run(args),
        Command::Guard(cmd) => guard::run(cmd),
        Command::Monitor(cmd) => monitor::run(cmd),
        Command::Feedback(cmd) => feedback::run(cmd),
        Command::Loop(args) => loop_cmd::run(args),
        Command::Models(cmd) => models::run(cmd),
        Command::Healthcheck(args) => healthcheck::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
