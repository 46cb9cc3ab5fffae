//! Building a mock guest (colo-mock's `MockDomain`) from command-line and config-file
//! settings. The mock's side of the backend contract (`Domain`, `GuestNic`, `Snapshot`) is in
//! colo-mock itself.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use colo_mock::{DirtyConfig, DiskConfig, KvConfig, MockConfig, MockDomain, Workload};

/// The workloads a mock guest can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// A key-value store serving client requests over UDP and TCP.
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

/// The mock guest's disk (`--disk`, `--disk-file`, `--disk-rate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskSpec {
    /// Size in bytes (a positive multiple of 4096); 0: no disk.
    pub size: u64,
    /// The image file (created if missing); None: an anonymous memfd.
    pub file: Option<PathBuf>,
    /// Keep the image's content (a primary's disk); else it is emptied first (a secondary's,
    /// filled by the initial synchronisation).
    pub keep: bool,
    /// dirty: blocks written per millisecond.
    pub rate: u64,
}

/// Builds the guest (paused), without a disk.
pub fn build(spec: &MockSpec) -> Result<MockDomain> {
    build_with_disk(spec, &DiskSpec::default())
}

/// Builds the guest (paused) with the disk `disk` (none when its size is 0).
pub fn build_with_disk(spec: &MockSpec, disk: &DiskSpec) -> Result<MockDomain> {
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
    if disk.size % 4096 != 0 {
        bail!("--disk must be a multiple of 4096 bytes, got {}", disk.size);
    }
    if disk.size == 0 && (disk.file.is_some() || disk.rate > 0) {
        bail!("--disk-file and --disk-rate need --disk SIZE");
    }
    let mut cfg = MockConfig::new(spec.ram / 4096, workload, spec.vm_seed);
    cfg.ram_path = spec.ram_file.clone();
    cfg.disk = (disk.size > 0).then(|| DiskConfig {
        bytes: disk.size,
        path: disk.file.clone(),
        keep: disk.keep,
        blocks_per_ms: disk.rate,
    });
    let dom = MockDomain::create(cfg).context("creating the mock guest")?;
    tracing::info!(
        "mock guest: {} MiB, dirty tracking: {}{}",
        spec.ram >> 20,
        dom.tracker_kind(),
        match dom.disk_image() {
            Some(d) => format!(", disk {} MiB", d.blocks() >> 8),
            None => String::new(),
        }
    );
    Ok(dom)
}
