//! `cargo xtask`: colo's automation — CI, fuzzing, benchmarks and the real-Xen test.
//!
//! Every step that needs a system package checks for it first and, when running as root,
//! installs it with apt-get (saying what it installs); otherwise it stops with the exact command.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod bench;
mod sys;
mod xen_test;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  ci               format check, clippy, every test (colo-xen included), fuzz smoke,
                   the real-Xen test
  fuzz [--seconds N] [--target NAME]
                   run the cargo-fuzz targets (installs cargo-fuzz if missing)
  bench [--quick] [--link-only] [--only SECTIONS] [--json FILE]
                   end-to-end speed figures (release build) beside raw loopback TCP;
                   --link-only: just the sealed link's cost (encrypted vs plaintext);
                   --only floor,idle,shaped,throughput: the pause beside its floor, an
                   idle pair's CPU, checkpoints over 1 and 10 Gbit/s links, 10,000-page
                   checkpoint throughput (with phases) and the initial sync vs raw TCP
  xen-test [--deadline SECS] [--checkpoints N] [--interval-ms MS] [--verbose] [--verify]
           [--takeovers N] [--advisory-takeover] [--advisory-colo] [--xen-debug]
           [--logdirty-stress SECS]
                   colo-xen on a real Xen 4.17 booted under QEMU (root; 3 to 30 min, as
                   fast as the emulation runs; `cargo xtask xen-test --help` for each flag)
  deps             install the system packages colo's build and tests need (root)
";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        print!("{USAGE}");
        bail!("no command given");
    };
    match cmd.as_str() {
        "ci" => ci(rest),
        "fuzz" => fuzz(rest),
        "deps" => {
            sys::ensure_packages(&sys::BUILD_PACKAGES)?;
            sys::ensure_packages(&sys::TEST_PACKAGES)
        }
        "bench" => bench::run(rest),
        "xen-test" => xen_test::run(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            print!("{USAGE}");
            bail!("unknown command `{other}`")
        }
    }
}

/// The repository root (the parent of xtask/).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo puts build output: `$CARGO_TARGET_DIR` when set (relative to the workspace),
/// else the workspace's `target/`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root().join(d),
        _ => root().join("target"),
    }
}

/// One CI step's outcome, for the summary.
struct Step {
    name: String,
    secs: f64,
}

/// Runs `cargo` with `args` in the repository root; fails if it fails.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("`cargo xtask ci` takes no arguments, got `{a}`");
    }
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        println!("\n==> xtask ci: {name}");
        let t = Instant::now();
        f().with_context(|| format!("CI step `{name}`"))?;
        steps.push(Step {
            name: name.to_string(),
            secs: t.elapsed().as_secs_f64(),
        });
        Ok(())
    };
    step("system packages", &mut || {
        sys::ensure_packages(&sys::BUILD_PACKAGES)?;
        sys::ensure_packages(&sys::TEST_PACKAGES)
    })?;
    step("cargo fmt --check", &mut || {
        cargo(&["fmt", "--all", "--", "--check"])
    })?;
    step("cargo clippy (all targets, all features)", &mut || {
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ])
    })?;
    step(
        "cargo test (all crates, all features, doc tests)",
        &mut || cargo(&["test", "--workspace", "--all-features"]),
    )?;
    step(
        "fuzz smoke (every cargo-fuzz target, 20 s each)",
        &mut || sys::run_fuzz(&root(), None, 20),
    )?;
    step(
        "xen-test (colo-xen on a real Xen 4.17 under QEMU)",
        // The takeover is required, as by `cargo xtask xen-test` alone: a survivor that runs
        // but does not go on fails CI. A fault Xen reports (a guest triple fault, a survivor
        // Xen crashed: emulation faults of QEMU's nested SVM, seen in guests colo never
        // touched) gets one more boot, named in the verdict.
        &mut || xen_test::check(&[]),
    )?;
    println!("\n==> xtask ci: summary");
    for s in &steps {
        println!("  ok  {:<50} {:>7.1} s", s.name, s.secs);
    }
    println!(
        "xtask ci: {} steps passed in {:.1} s",
        steps.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn fuzz(args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut target: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().context("--seconds needs a value")?;
                seconds = v
                    .parse()
                    .with_context(|| format!("--seconds: `{v}` is not a whole number"))?;
            }
            "--target" => target = Some(it.next().context("--target needs a value")?.clone()),
            other => bail!("fuzz: unknown argument `{other}`"),
        }
    }
    sys::run_fuzz(&root(), target.as_deref(), seconds)
}
