//! Disk failover with real processes: `colo primary` and `colo secondary` with kv guests on
//! virtual disks (`--disk`, image files), a verifying kv client, and the primary SIGKILLed at
//! seeded moments. After the takeover and more client traffic the survivor is SIGKILLed too and
//! its disk image is read offline, by itself: its kv table must hold exactly what the client
//! was acknowledged (every acknowledged write, nothing else), and must equal the table in the
//! survivor's RAM (its RAM file), i.e. no disk checkpoint was torn from its memory checkpoint.
//! Both disk mirror modes: with `--disk-mirror continuous` the primary mostly dies with blocks
//! mirrored for the next checkpoint staged on the secondary, which must drop them.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_cli::kvclient::KvClient;
use colo_mock::guest::{kv_table_from_disk, kv_table_from_ram};
use serde_json::Value;

/// A node process, SIGKILLed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The files of one trial: a directory for logs, status files and disk images, and the
/// survivor's RAM file under /dev/shm.
struct Files {
    dir: PathBuf,
    ram: PathBuf,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ram);
    }
}

fn node(role: &str, dir: &Path, args: Vec<String>) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{role}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_colo"))
        .arg(role)
        .args(args)
        .arg("--status-file")
        .arg(dir.join(format!("{role}.json")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// Waits (a hang guard, not a timing assertion) until `role`'s status satisfies `ok`.
fn await_status(dir: &Path, role: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let path = dir.join(format!("{role}.json"));
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let v: Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < give_up,
            "{role} never reached {what}: {v}; logs in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn trial(seed: u64, mirror: &str) -> (u64, usize) {
    let tag = format!("colo-disk-fo-{mirror}-{}-{seed}", std::process::id());
    let files = Files {
        dir: std::env::temp_dir().join(&tag),
        ram: PathBuf::from("/dev/shm").join(format!("{tag}.ram")),
    };
    let dir = &files.dir;
    std::fs::create_dir_all(dir).unwrap();
    let held: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addr = |i: usize| format!("127.0.0.1:{}", held[i].local_addr().unwrap().port());
    let (repl, pclient, sclient) = (addr(0), addr(1), addr(2));
    drop(held);
    let shared = |name: &str, image: &str| -> Vec<String> {
        let mut v: Vec<String> = [
            "--ram",
            "8M",
            "--workload",
            "kv",
            "--output-divergence",
            "0.02",
            "--heartbeat-timeout-ms",
            "1000",
            "--disk",
            "4M",
            "--disk-mirror",
            mirror,
            "--disk-mirror-interval-ms",
            "1",
        ]
        .map(String::from)
        .to_vec();
        v.extend([
            "--disk-file".into(),
            dir.join(image).display().to_string(),
            "--name".into(),
            format!("{tag}-{name}"),
        ]);
        v
    };
    let mut sargs = vec![
        "--listen".into(),
        repl.clone(),
        "--client".into(),
        sclient.clone(),
        "--ram-file".into(),
        files.ram.display().to_string(),
    ];
    sargs.extend(shared("s", "s.disk"));
    let mut secondary = node("secondary", dir, sargs);
    let mut pargs = vec![
        "--peer".into(),
        repl,
        "--client".into(),
        pclient.clone(),
        "--max-interval-ms".into(),
        "20".into(),
    ];
    pargs.extend(shared("p", "p.disk"));
    let mut primary = node("primary", dir, pargs);
    await_status(dir, "primary", "protection", |v| v["protected"] == true);

    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let kill_after = Duration::from_millis(100 + rng % 700);
    let mut client = KvClient::new(vec![pclient, sclient], 43500, Duration::from_millis(1500));
    let deadline = || Instant::now() + Duration::from_secs(30);
    let t = Instant::now();
    while t.elapsed() < kill_after {
        client.random_op(&mut rng, 128, deadline()).unwrap();
    }
    primary.kill();
    for _ in 0..150 {
        client.random_op(&mut rng, 128, deadline()).unwrap();
    }
    client.verify_all(deadline()).unwrap();
    assert_eq!(client.stats.lost_acked_writes, 0, "seed {seed}");
    let v = await_status(dir, "secondary", "the takeover", |v| {
        v["role"] == "primary" && v["failover_reason"].is_string()
    });
    assert_eq!(v["protected"], false, "seed {seed}: {v}");
    // The survivor dies too; what is on its disk is all that is left.
    secondary.kill();
    let image = std::fs::read(dir.join("s.disk")).unwrap();
    let on_disk = kv_table_from_disk(&image).unwrap();
    assert!(client.uncertain().is_empty());
    let told: BTreeMap<Vec<u8>, Vec<u8>> = client
        .acknowledged()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let lost = told
        .iter()
        .filter(|(k, v)| on_disk.get(*k) != Some(*v))
        .count();
    let extra = on_disk.keys().filter(|k| !told.contains_key(*k)).count();
    assert_eq!(
        (lost, extra),
        (0, 0),
        "seed {seed}: the survivor's disk image lost {lost} acknowledged writes and holds {extra} \
         keys the client was told are absent; logs in {}",
        dir.display()
    );
    let ram = std::fs::read(&files.ram).unwrap();
    assert_eq!(
        kv_table_from_ram(&ram, 256),
        on_disk,
        "seed {seed}: the survivor's disk table is not its memory's (a torn disk checkpoint)"
    );
    let _ = std::fs::remove_dir_all(dir);
    (client.stats.acked_writes, told.len())
}

#[test]
fn a_primary_killed_at_seeded_moments_leaves_every_acknowledged_write_on_the_survivors_disk() {
    kills("checkpoint", 12);
}

#[test]
fn a_primary_killed_while_mirrored_blocks_are_staged_leaves_every_acknowledged_write() {
    kills("continuous", 8);
}

fn kills(mirror: &str, trials: u64) {
    let mut acked = 0;
    for seed in 1..=trials {
        let (a, keys) = trial(seed, mirror);
        assert!(a > 0 && keys > 0, "seed {seed}: nothing was written");
        acked += a;
    }
    eprintln!(
        "{trials} primaries killed ({mirror}): {acked} acknowledged writes, all on the survivors' \
         disks"
    );
}
