//! The node's TOML config file (same settings as the `colo primary`/`colo secondary` flags; flags
//! win), size parsing (`64M`, `1GiB`, …) and reading the link's pre-shared key file.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer};

/// Largest config or key file read, bytes.
const MAX_FILE: u64 = 1 << 20;

/// Every setting a node accepts, all optional; a flag given on the command line overrides the
/// file. Unknown keys are an error.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `mock` or `xen`.
    pub backend: Option<String>,
    /// Guest RAM in bytes; in the file either an integer or a size string such as `"64M"`.
    #[serde(default, deserialize_with = "de_size")]
    pub ram: Option<u64>,
    /// File backing the mock guest's RAM.
    pub ram_file: Option<PathBuf>,
    /// `kv` or `dirty`.
    pub workload: Option<String>,
    /// Xen domain id.
    pub domid: Option<u32>,
    /// The peer's replication address (primary), HOST:PORT.
    pub peer: Option<String>,
    /// The replication listen address (secondary).
    pub listen: Option<String>,
    /// The client-facing address of the mock network path.
    pub client: Option<String>,
    /// Xen: the guest's vif in dom0 (`vif7.0`).
    pub vif: Option<String>,
    /// Xen: colo serves the guest's vif itself, with this MAC (`00:16:3e:…`).
    pub pv_vif: Option<String>,
    /// Xen: colo serves the guest's disk itself from this image file (`/var/lib/colo/xvda.img`).
    pub pv_vbd: Option<PathBuf>,
    /// Xen: the service network's interface (`colo0`).
    pub service_if: Option<String>,
    /// `backchannel` or `primary-only`.
    pub sync_mode: Option<String>,
    /// The link's pre-shared key file.
    pub key_file: Option<PathBuf>,
    /// Verify every checkpoint with memory digests.
    pub verify: Option<bool>,
    /// Keep the link's records unencrypted although there is a key (both nodes).
    pub insecure_plaintext: Option<bool>,
    /// Xen: the guest's event-channel upcall vector (`"none"`, `243`, `"0xf3"`).
    pub upcall_vector: Option<String>,
    /// Minimum time between checkpoints, ms.
    pub min_interval_ms: Option<u64>,
    /// Maximum time between checkpoints (periodic checkpoint), ms.
    pub max_interval_ms: Option<u64>,
    /// How long an unmatched output is held before a checkpoint, ms.
    pub compare_timeout_ms: Option<u64>,
    /// Heartbeat period, ms.
    pub heartbeat_interval_ms: Option<u64>,
    /// Silence after which the peer is declared lost, ms.
    pub heartbeat_timeout_ms: Option<u64>,
    /// Command run to fence the lost peer before taking over.
    pub fence_cmd: Option<String>,
    /// The pair's arbiter, `etcd://HOST:PORT[,HOST:PORT...]`.
    pub arbiter: Option<String>,
    /// The pair's name in the arbiter.
    pub arbiter_pair: Option<String>,
    /// The arbiter lease's TTL, s.
    pub arbiter_ttl: Option<u64>,
    /// `wait` or `exit` when a failure finds the arbiter unreachable.
    pub arbiter_unreachable: Option<String>,
    /// Prometheus endpoint address, HOST:PORT.
    pub metrics: Option<String>,
    /// Node name (names the control socket).
    pub name: Option<String>,
    /// Fraction of outputs on which the guests diverge (mock workloads).
    pub output_divergence: Option<f64>,
    /// Whether the mock guests' memory diverges; `true`/`false` or `"on"`/`"off"`.
    #[serde(default, deserialize_with = "de_on_off")]
    pub memory_divergence: Option<bool>,
}

/// Reads and parses a config file. Errors name the file, and for a syntax error or an unknown or
/// mistyped key, its line and column.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text = read_limited(path, "config file")?;
    let text = String::from_utf8(text)
        .with_context(|| format!("config file {} is not UTF-8", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // toml's message is multi-line (it quotes the offending line); keep it whole.
        anyhow::anyhow!(
            "invalid config file {}: {}",
            path.display(),
            e.to_string().trim_end()
        )
    })
}

/// An x86 interrupt vector to deliver to a Xen guest, or none (`--upcall-vector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpcallVector(pub Option<u8>);

/// Parses `--upcall-vector`: `none`, or a vector from 16 to 255 in decimal or `0x` hex (0–15
/// are exceptions, not interrupts).
pub fn parse_vector(s: &str) -> Result<UpcallVector, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(UpcallVector(None));
    }
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|_| format!("invalid vector {s:?}: expected none, a number or 0x-hex"))?;
    match u8::try_from(v) {
        Ok(v) if v >= 16 => Ok(UpcallVector(Some(v))),
        _ => Err(format!(
            "invalid vector {s:?}: interrupt vectors run from 16 to 255"
        )),
    }
}

/// Parses a size: a decimal integer with an optional binary suffix — `K`, `M`, `G`, `T`, each
/// optionally followed by `iB` or `B` (all powers of 1024), or `B` alone. Case-insensitive.
/// `4096` is 4096 bytes, `64M` and `64MiB` are 64·2²⁰.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a whole number with an optional unit, e.g. 4096, 64M, 1GiB"
        ));
    }
    let shift = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use K, M, G, T, optionally with iB)"
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: larger than 2^64 bytes"))
}

/// Reads a pre-shared key file: the whole content minus trailing newlines. Rejects an
/// unreadable, oversized or empty file, naming it; warns if others than the owner may read it.
pub fn read_key_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut key = read_limited(path, "key file")?;
    while matches!(key.last(), Some(b'\n' | b'\r')) {
        key.pop();
    }
    if key.is_empty() {
        bail!("key file {} is empty", path.display());
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "key file is readable by group or others; chmod 600 it"
            );
        }
    }
    Ok(key)
}

/// Reads at most [`MAX_FILE`] bytes of a regular file, with errors naming it.
fn read_limited(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let file =
        File::open(path).with_context(|| format!("cannot open {what} {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {} is not a regular file", path.display());
    }
    if meta.len() > MAX_FILE {
        bail!(
            "{what} {} is too large ({} bytes, limit {MAX_FILE})",
            path.display(),
            meta.len()
        );
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    if buf.len() as u64 > MAX_FILE {
        bail!(
            "{what} {} is too large (limit {MAX_FILE} bytes)",
            path.display()
        );
    }
    Ok(buf)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Int(u64),
    Str(String),
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<SizeValue>::deserialize(d)? {
        None => Ok(None),
        Some(SizeValue::Int(n)) => Ok(Some(n)),
        Some(SizeValue::Str(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OnOff {
    Bool(bool),
    Str(String),
}

fn de_on_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Option::<OnOff>::deserialize(d)? {
        None => Ok(None),
        Some(OnOff::Bool(b)) => Ok(Some(b)),
        Some(OnOff::Str(s)) => match s.to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" => Ok(Some(true)),
            "off" | "false" | "no" => Ok(Some(false)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid value {s:?}: expected on or off"
            ))),
        },
    }
}

/// A scratch directory for tests, removed on drop.
#[cfg(test)]
pub(crate) mod testdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    static NEXT: AtomicU32 = AtomicU32::new(0);

    /// A fresh, empty directory under the system temp dir.
    #[derive(Debug)]
    pub(crate) struct TestDir(PathBuf);

    impl TestDir {
        pub(crate) fn new() -> Self {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("colo-t{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create test dir");
            Self(p)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdir::TestDir;
    use super::*;

    #[test]
    fn parse_vector_cases() {
        assert_eq!(parse_vector("0xf3"), Ok(UpcallVector(Some(0xf3))));
        assert_eq!(parse_vector("243"), Ok(UpcallVector(Some(243))));
        assert_eq!(parse_vector("none"), Ok(UpcallVector(None)));
        for bad in ["", "0x", "256", "15", "-1", "f3", "0xf3f"] {
            let e = parse_vector(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn parse_size_cases() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2 GB"), Ok(2 << 30));
        assert_eq!(parse_size("8K"), Ok(8192));
        assert_eq!(parse_size("100b"), Ok(100));
        assert_eq!(parse_size(" 3T "), Ok(3 << 40));
        for bad in [
            "",
            "M",
            "abc",
            "1.5G",
            "-1",
            "12X",
            "1GiBB",
            "99999999999999999999",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
        assert!(parse_size("17179869184G").unwrap_err().contains("2^64"));
        assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn good_file() {
        let d = TestDir::new();
        let p = d.path().join("node.toml");
        std::fs::write(
            &p,
            r#"
backend = "mock"
ram = "64M"
workload = "kv"
peer = "10.0.0.2:7000"
listen = "0.0.0.0:7000"
client = "127.0.0.1:8000"
sync_mode = "backchannel"
key_file = "/etc/colo/key"
verify = true
min_interval_ms = 5
max_interval_ms = 2000
compare_timeout_ms = 50
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000
fence_cmd = "ssh peer poweroff"
metrics = "127.0.0.1:9100"
name = "pvm"
output_divergence = 0.01
memory_divergence = "off"
domid = 7
ram_file = "/var/lib/colo/ram"
"#,
        )
        .unwrap();
        let c = load(&p).unwrap();
        assert_eq!(c.backend.as_deref(), Some("mock"));
        assert_eq!(c.ram, Some(64 << 20));
        assert_eq!(c.peer.as_deref(), Some("10.0.0.2:7000"));
        assert_eq!(c.key_file.as_deref(), Some(Path::new("/etc/colo/key")));
        assert_eq!(c.verify, Some(true));
        assert_eq!(c.max_interval_ms, Some(2000));
        assert_eq!(c.heartbeat_timeout_ms, Some(1000));
        assert_eq!(c.output_divergence, Some(0.01));
        assert_eq!(c.memory_divergence, Some(false));
        assert_eq!(c.domid, Some(7));
        assert_eq!(c.name.as_deref(), Some("pvm"));

        std::fs::write(&p, "ram = 1048576\nmemory_divergence = true\n").unwrap();
        let c = load(&p).unwrap();
        assert_eq!(c.ram, Some(1 << 20));
        assert_eq!(c.memory_divergence, Some(true));
        assert_eq!(c.backend, None);

        std::fs::write(&p, "").unwrap();
        assert_eq!(load(&p).unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let d = TestDir::new();
        let p = d.path().join("node.toml");
        std::fs::write(&p, "backend = \"mock\"\nbogus_key = 3\n").unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("bogus_key"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        let d = TestDir::new();
        let p = d.path().join("node.toml");
        std::fs::write(&p, "ram = \"lots\"\n").unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("invalid size") && e.contains("line 1"), "{e}");

        std::fs::write(&p, "memory_divergence = \"maybe\"\n").unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("expected on or off"), "{e}");

        std::fs::write(&p, "domid = \"seven\"\n").unwrap();
        assert!(load(&p).is_err());

        std::fs::write(&p, "backend = \n").unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let d = TestDir::new();
        let p = d.path().join("nope.toml");
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("nope.toml"), "{e}");
        let e = format!("{:#}", read_key_file(&p).unwrap_err());
        assert!(e.contains("nope.toml") && e.contains("key file"), "{e}");
        let e = format!("{:#}", load(d.path()).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn key_file() {
        let d = TestDir::new();
        let p = d.path().join("key");
        std::fs::write(&p, "s3cret\r\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_key_file(&p).unwrap(), b"s3cret");
        std::fs::write(&p, "a b\n\n").unwrap();
        assert_eq!(read_key_file(&p).unwrap(), b"a b");
        // Group-readable still loads (with a warning).
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_key_file(&p).unwrap(), b"a b");
        std::fs::write(&p, "\n").unwrap();
        let e = format!("{:#}", read_key_file(&p).unwrap_err());
        assert!(
            e.contains("empty") && e.contains(&p.display().to_string()),
            "{e}"
        );
    }
}
