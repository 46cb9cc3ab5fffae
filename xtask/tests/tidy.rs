//! Tidy checks on the source tree (run by `cargo test`, so by `cargo xtask ci`): colo-core does
//! no IO and reads no clock, every source file says what it is for in a `//!` first line,
//! ARCHITECTURE.md names every source file, and the engine's state diagrams name every state.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, skipping build output.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && name != ".git" && name != "corpus" && name != "artifacts" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The workspace's source files (crates and the fuzz crate), relative to the root.
fn sources() -> Vec<String> {
    let root = root();
    let mut files = Vec::new();
    for krate in [
        "colo-core",
        "colo-mock",
        "colo-xen",
        "colo-cli",
        "xtask",
        "fuzz",
    ] {
        rust_files(&root.join(krate), &mut files);
    }
    let mut rel: Vec<String> = files
        .iter()
        .filter_map(|p| p.strip_prefix(&root).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    rel.sort();
    assert!(rel.len() > 50, "only {} source files found", rel.len());
    rel
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

#[test]
fn every_source_file_starts_with_a_doc_line() {
    let bad: Vec<String> = sources()
        .into_iter()
        .filter(|f| !read(f).starts_with("//!"))
        .collect();
    assert!(
        bad.is_empty(),
        "these files do not start with a `//!` line saying what they are for: {bad:?}"
    );
}

#[test]
fn colo_core_does_no_io_and_reads_no_clock() {
    const FORBIDDEN: [&str; 14] = [
        "std::fs",
        "std::thread",
        "std::process",
        "std::os::",
        "std::net::Tcp",
        "std::net::Udp",
        "TcpStream",
        "TcpListener",
        "UdpSocket",
        "std::io::stdin",
        "std::io::stdout",
        "Instant::now()",
        "SystemTime::now()",
        "println!",
    ];
    let mut bad = Vec::new();
    for f in sources()
        .into_iter()
        .filter(|f| f.starts_with("colo-core/src/"))
    {
        let text = read(&f);
        // Unit tests at the bottom of a file may use the clock and the file system.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for word in FORBIDDEN {
                if line.contains(word) {
                    bad.push(format!("{f}:{}: {word}", n + 1));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "colo-core is sans-IO (it is fed events and the time): {bad:#?}"
    );
}

#[test]
fn architecture_names_every_source_file() {
    let arch = read("ARCHITECTURE.md");
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|f| !f.contains("/tests/") && !f.contains("/benches/") && !f.ends_with("build.rs"))
        .filter(|f| {
            // Named by its path inside the crate (`engine/primary.rs`, `bin/colo-xen-check.rs`)
            // or in full.
            let inner = f.split_once("/src/").map_or(f.as_str(), |(_, p)| p);
            !arch.contains(f.as_str()) && !arch.contains(&format!("`{inner}`"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name these source files: {missing:#?}"
    );
}

/// The variant names of `pub enum NAME` in `text`.
fn variants(text: &str, name: &str) -> Vec<String> {
    let start = text
        .find(&format!("pub enum {name} {{"))
        .unwrap_or_else(|| panic!("no `pub enum {name}`"));
    let body = &text[start..];
    let body = &body[body.find('{').unwrap_or(0) + 1..];
    let mut out = Vec::new();
    let mut depth = 0;
    for line in body.lines() {
        let t = line.trim();
        if depth == 0 && t == "}" {
            break;
        }
        if depth == 0 && !t.starts_with("//") && !t.starts_with('#') {
            let ident: String = t
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if ident.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                out.push(ident);
            }
        }
        depth += t.matches('{').count();
        depth -= t.matches('}').count().min(depth);
    }
    out
}

#[test]
fn the_state_diagrams_name_every_state() {
    let docs: String = read("colo-core/src/engine/mod.rs")
        .lines()
        .filter(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut missing = Vec::new();
    for (file, e) in [
        ("colo-core/src/engine/primary.rs", "PrimaryState"),
        ("colo-core/src/engine/secondary.rs", "SecondaryState"),
    ] {
        let names = variants(&read(file), e);
        assert!(names.len() >= 5, "{e}: only {names:?} found");
        for v in names {
            if !docs.contains(&v) {
                missing.push(format!("{e}::{v}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "states missing from the diagrams in colo-core/src/engine/mod.rs: {missing:?}"
    );
}
