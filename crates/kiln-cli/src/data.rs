//! `kiln data …`: datasets.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_data::{SynthOptions, write_world};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Write the built-in synthetic world: pre-training corpus, SFT data, preference pairs,
    /// RL prompts and held-out evaluation sets, all in TRL's formats.
    #[command(after_help = "Example:\n  kiln data synth --out data/world --seed 7")]
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// The same seed writes byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// About five times smaller, for quick runs and tests.
    #[arg(long)]
    quick: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    let DataCommand::Synth(args) = cmd;
    let opts = SynthOptions::sized(args.quick, args.seed);
    let summary =
        write_world(&args.out, &opts).with_context(|| format!("writing {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "synthetic world (seed {}) in {}",
        summary.seed,
        summary.out_dir.display()
    );
    for f in &summary.files {
        match f.rows {
            Some(rows) => println!("  {:<28} {rows:>6} rows", f.name),
            None => println!("  {}", f.name),
        }
    }
    Ok(())
}
