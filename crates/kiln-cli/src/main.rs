//! `kiln`: one binary for a language model's whole life. This commands load, inspect,
//! run and score Hugging Face checkpoints; training, serving and the rest arrive as subcommands.

mod eval;
mod generate;
mod info;
mod model_args;
mod pretrain;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Pre-train, fine-tune, align, quantize and serve language models", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(generate::GenerateArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Describe a model: architecture, parameters, dtype, context length.
    Info(info::InfoArgs),
    /// Pre-train a Llama from scratch on a text corpus.
    Pretrain(pretrain::PretrainArgs),
}

fn main() -> ExitCode {
    kiln_core::init_cpu_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Info(args) => info::run(args),
        Command::Pretrain(args) => pretrain::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
