//! System prerequisites for xtask: Debian packages (installed with apt-get as root) and tools
//! installed with cargo (cargo-fuzz).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Packages every build of the whole workspace needs: colo-xen's `xen` feature runs bindgen
/// (libclang) over the Xen headers and links libxenctrl / libxenforeignmemory.
pub const BUILD_PACKAGES: [&str; 2] = ["libxen-dev", "libclang-dev"];

/// Packages the tests need beyond the build: a real etcd for the arbiter's tests (they start
/// their own server on loopback ports; on a machine with systemd the package also starts one
/// on 2379, which the tests leave alone).
pub const TEST_PACKAGES: [&str; 1] = ["etcd-server"];

fn is_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Makes sure each Debian package in `pkgs` is installed: installs the missing ones with
/// apt-get when running as root, otherwise stops with the exact command to run.
pub fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        println!("system packages present: {}", pkgs.join(", "));
        return Ok(());
    }
    let cmd = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!(
            "missing system packages: {}; run as root: {cmd}",
            missing.join(", ")
        );
    }
    println!("installing missing system packages: {}", missing.join(", "));
    let status = Command::new("sh")
        .args(["-c", &format!("DEBIAN_FRONTEND=noninteractive {cmd}")])
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get failed ({status}); run by hand: {cmd}");
    }
    Ok(())
}

/// Installs cargo-fuzz if it is missing.
pub fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    println!("installing cargo-fuzz (cargo install cargo-fuzz --locked, ~3 min)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status}); run it by hand: cargo install cargo-fuzz --locked");
    }
    Ok(())
}

/// Runs every fuzz target under `<root>/fuzz` (or just `target`) for `seconds` each.
pub fn run_fuzz(root: &Path, target: Option<&str>, seconds: u64) -> Result<()> {
    let dir = root.join("fuzz");
    if !dir.join("Cargo.toml").exists() {
        bail!("no fuzz crate at {}", dir.display());
    }
    ensure_cargo_fuzz()?;
    let targets: Vec<String> = match target {
        Some(t) => vec![t.to_string()],
        None => {
            let out = Command::new("cargo")
                .args(["fuzz", "list"])
                .current_dir(root)
                .output()
                .context("cargo fuzz list")?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .filter(|l| !l.is_empty())
                .collect()
        }
    };
    for t in &targets {
        println!("fuzzing {t} for {seconds} s");
        let status = Command::new("cargo")
            .args([
                "fuzz",
                "run",
                "--sanitizer",
                "none",
                t,
                "--",
                &format!("-max_total_time={seconds}"),
            ])
            .current_dir(root)
            .status()
            .with_context(|| format!("cargo fuzz run {t}"))?;
        if !status.success() {
            bail!("fuzz target {t} found a failure ({status})");
        }
    }
    Ok(())
}
