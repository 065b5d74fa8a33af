//! `cargo xtask fuzz [--seconds N] [TARGET]...`: runs the cargo-fuzz targets
//! of `fuzz/` (the parsers of what users and files hand portfwd), each for a
//! bounded time. Not part of `cargo xtask test`: fuzzing is open-ended, and
//! it needs nightly and cargo-fuzz.
//!
//! The corpus each run grows is kept in `fuzz/corpus/<target>` (ignored by
//! git); `fuzz/seeds/<target>` holds the checked-in starting inputs. A crash
//! leaves its input in `fuzz/artifacts/<target>/`; reproduce it with
//! `cargo +nightly fuzz run --fuzz-dir fuzz <target> <file>`.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{build, cargo, cargo_bin_dir, display, nightly, root, run, setup, succeeds};

/// Every target of fuzz/Cargo.toml.
pub(crate) const TARGETS: &[&str] = &["publish", "unmap_selector", "state", "apply"];

#[derive(clap::Args)]
pub(crate) struct Args {
    /// How long to fuzz each target.
    #[arg(long, default_value_t = 30)]
    pub(crate) seconds: u64,
    /// Targets to run (default: all of them).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub(crate) targets: Vec<String>,
}

/// What one target's run did.
struct Outcome {
    target: String,
    /// Wall time, including the build before the first target.
    wall: u64,
    execs: Option<u64>,
    crashed: bool,
}

pub(crate) fn fuzz(args: Args) -> Result<()> {
    // The nightly toolchain comes with the eBPF prerequisites, and portfwd's
    // build script embeds the eBPF object, so build that first.
    setup::install()?;
    install_cargo_fuzz()?;
    let object = build::build_ebpf(true)?;

    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        args.targets
    };
    let fuzz_dir = root().join("fuzz");
    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(fuzz_one(&fuzz_dir, &object, target, args.seconds)?);
    }

    println!("\nfuzz summary:");
    for o in &outcomes {
        let execs = o.execs.map_or("?".into(), |n| n.to_string());
        let result = if o.crashed {
            format!("CRASH (see fuzz/artifacts/{}/)", o.target)
        } else {
            "ok".into()
        };
        println!(
            "  {:<16} {:>12} execs in {:>4} s  {result}",
            o.target, execs, o.wall
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashed)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz targets failed: {}", crashed.join(", "));
    }
    Ok(())
}

fn install_cargo_fuzz() -> Result<()> {
    let installed = cargo_bin_dir().is_some_and(|d| d.join("cargo-fuzz").is_file())
        || succeeds(Command::new("cargo-fuzz").arg("--version"));
    if !installed {
        println!("installing cargo-fuzz");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

fn fuzz_one(fuzz_dir: &Path, object: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let seeds = fuzz_dir.join("seeds").join(target);

    let mut cmd = nightly("cargo");
    cmd.current_dir(root())
        .env(build::EBPF_OBJ_ENV, object)
        .arg("fuzz")
        .arg("run")
        .arg("--fuzz-dir")
        .arg(fuzz_dir)
        .arg(target)
        // New inputs go to the first directory; the seeds are only read.
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1");
    println!("\n== fuzz {target} for {seconds} s: {}", display(&cmd));

    // libFuzzer reports on stderr: pass it through and keep the final count.
    let started = Instant::now();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    let mut execs = None;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if let Some(n) = executed_units(&line) {
                execs = Some(n);
            }
        }
    }
    let status = child.wait()?;
    Ok(Outcome {
        target: target.to_owned(),
        wall: started.elapsed().as_secs(),
        execs,
        crashed: !status.success(),
    })
}

/// The number of runs in libFuzzer's final statistics line.
fn executed_units(line: &str) -> Option<u64> {
    line.strip_prefix("stat::number_of_executed_units:")
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_give_the_exec_count() {
        assert_eq!(
            executed_units("stat::number_of_executed_units: 123456"),
            Some(123456)
        );
        assert_eq!(executed_units("#2 INITED cov: 5 ft: 5"), None);
    }

    #[test]
    fn every_target_is_declared_in_the_fuzz_crate() {
        let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target} is not a [[bin]] of fuzz/Cargo.toml"
            );
        }
    }
}
