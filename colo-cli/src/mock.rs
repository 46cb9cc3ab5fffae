//! Building a mock guest (colo-mock's `MockDomain`) from command-line and config-file
//! settings. The mock's side of the backend contract (`Domain`, `GuestNic`, `Snapshot`) is in
//! colo-mock itself.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use colo_mock::{DirtyConfig, KvConfig, MockConfig, MockDomain, Workload};

/// The workloads a mock guest can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// A key-value store serving client requests.
    Kv,
    /// Dirties random pages at a fixed rate (benchmarks).
    Dirty,
}

/// Everything needed to build a mock guest.
#[derive(Debug, Clone)]
pub struct MockSpec {
    /// RAM in bytes.
    pub ram: u64,
    /// Backing file (under /dev/shm), or a memfd.
    pub ram_file: Option<PathBuf>,
    /// Workload.
    pub workload: WorkloadKind,
    /// Per-VM entropy seed.
    pub vm_seed: u64,
    /// kv: memory divergence.
    pub memory_divergence: bool,
    /// kv: fraction of divergent responses.
    pub output_divergence: f64,
    /// dirty: pages per millisecond.
    pub dirty_rate: u64,
}

/// Builds the guest (paused).
pub fn build(spec: &MockSpec) -> Result<MockDomain> {
    if spec.ram % 4096 != 0 || spec.ram == 0 {
        bail!(
            "--ram must be a positive multiple of 4096 bytes, got {}",
            spec.ram
        );
    }
    if !(0.0..=1.0).contains(&spec.output_divergence) {
        bail!(
            "--output-divergence must be between 0 and 1, got {}",
            spec.output_divergence
        );
    }
    let workload = match spec.workload {
        WorkloadKind::Kv => Workload::Kv(KvConfig {
            memory_divergence: spec.memory_divergence,
            output_divergence: spec.output_divergence,
            ..KvConfig::default()
        }),
        WorkloadKind::Dirty => Workload::Dirty(DirtyConfig {
            pages_per_ms: spec.dirty_rate,
            ..DirtyConfig::default()
        }),
    };
    let mut cfg = MockConfig::new(spec.ram / 4096, workload, spec.vm_seed);
    cfg.ram_path = spec.ram_file.clone();
    let dom = MockDomain::create(cfg).context("creating the mock guest")?;
    tracing::info!(
        "mock guest: {} MiB, dirty tracking: {}",
        spec.ram >> 20,
        dom.tracker_kind()
    );
    Ok(dom)
}
