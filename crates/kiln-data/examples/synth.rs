//! Writes the synthetic world: `cargo run -p kiln-data --example synth -- OUT_DIR [SEED] [--quick]`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args.next().ok_or("usage: synth OUT_DIR [SEED] [--quick]")?;
    let rest: Vec<String> = args.collect();
    let quick = rest.iter().any(|a| a == "--quick");
    let seed = match rest.iter().find(|a| *a != "--quick") {
        Some(s) => s.parse()?,
        None => 0,
    };
    let base = if quick {
        kiln_data::SynthOptions::quick()
    } else {
        kiln_data::SynthOptions::default()
    };
    let opts = kiln_data::SynthOptions { seed, ..base };
    let summary = kiln_data::write_world(std::path::Path::new(&out), &opts)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
