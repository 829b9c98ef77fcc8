//! Writes the Gateway API conformance report from the result files the
//! conformance tests leave (`WEFT_CONFORMANCE_RESULTS`), prints it, and
//! saves it as YAML: `--results DIR --out FILE --version V`. Run by
//! `cargo xtask conformance`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use weft_e2e::conformance::{read_results, report};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let results_dir = PathBuf::from(arg(&args, "--results").context("--results DIR")?);
    let out = PathBuf::from(arg(&args, "--out").context("--out FILE")?);
    let version = arg(&args, "--version").unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
    let date = arg(&args, "--date").context("--date (RFC 3339)")?;
    let results = read_results(&results_dir);
    let r = report::build(&results, &date, &version);
    let text = report::to_yaml(&r, &results);
    print!("{text}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("weft-conformance-report: wrote {}", out.display());
    Ok(())
}
