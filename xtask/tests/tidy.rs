//! Tidy checks on the source tree (run by `cargo test`, so by `cargo xtask ci`): colo-core does
//! no IO and reads no clock, every source file says what it is for in a `//!` first line,
//! ARCHITECTURE.md names every source file, and the engine's state diagrams name every state and
//! every field a state carries, and no state that does not exist.

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

/// The variants of `enum NAME` (public or not) in `text`, each with the names of the fields it
/// carries.
fn variants(text: &str, name: &str) -> Vec<(String, Vec<String>)> {
    let start = text
        .find(&format!("enum {name} {{"))
        .unwrap_or_else(|| panic!("no `enum {name}`"));
    let body = &text[start..];
    let body = &body[body.find('{').unwrap_or(0) + 1..];
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut depth = 0;
    for line in body.lines() {
        let t = line.trim();
        if depth == 0 && t == "}" {
            break;
        }
        if !t.starts_with("//") && !t.starts_with('#') {
            let ident: String = t
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if depth == 0 && ident.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                out.push((ident, Vec::new()));
            } else if depth == 1 && t[ident.len()..].starts_with(':') {
                if let Some((_, fields)) = out.last_mut() {
                    fields.push(ident);
                }
            }
        }
        depth += t.matches('{').count();
        depth -= t.matches('}').count().min(depth);
    }
    out
}

/// The words of `line` that look like state names (CamelCase: a capital, then a lowercase).
fn camel_words(line: &str) -> Vec<&str> {
    line.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .filter(|w| {
            w.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && w.chars().nth(1).is_some_and(|c| c.is_ascii_lowercase())
        })
        .collect()
}

/// The lines of the state diagram block of `engine/mod.rs` (the `text` block under `# States`)
/// from the line `section` (PRIMARY, SECONDARY) to the next section or the block's end.
fn diagram(docs: &str, section: &str) -> Vec<String> {
    let states = &docs[docs.find("# States").expect("a `# States` section")..];
    let block = states
        .split("```")
        .nth(1)
        .expect("a diagram block under `# States`");
    block
        .lines()
        .skip_while(|l| l.trim() != section)
        .skip(1)
        .take_while(|l| !l.starts_with(|c: char| c.is_ascii_uppercase()))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_state_diagrams_name_every_state() {
    let docs: String = read("colo-core/src/engine/mod.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let mut wrong = Vec::new();
    for (file, e, section) in [
        ("colo-core/src/engine/primary.rs", "PrimaryState", "PRIMARY"),
        (
            "colo-core/src/engine/secondary.rs",
            "SecondaryState",
            "SECONDARY",
        ),
    ] {
        let code = read(file);
        let states = variants(&code, e);
        assert!(states.len() >= 5, "{e}: only {states:?} found");
        let lines = diagram(&docs, section);
        assert!(lines.len() >= 5, "no {section} diagram: {lines:?}");
        for (v, fields) in &states {
            if !lines.iter().any(|l| camel_words(l).contains(&v.as_str())) {
                wrong.push(format!("{e}::{v} is missing from the {section} diagram"));
            }
            if !code.contains(&format!("=> \"{v}\"")) {
                wrong.push(format!("{e}::{v}: `name()` does not return \"{v}\""));
            }
            // The diagrams write the epoch as (n); every other field a state carries is listed
            // on a line that names the state.
            for f in fields.iter().filter(|f| *f != "epoch") {
                let listed = lines.iter().any(|l| {
                    camel_words(l).contains(&v.as_str())
                        && l.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                            .any(|w| w == f)
                });
                if !listed {
                    wrong.push(format!(
                        "{e}::{v} carries `{f}`, which no diagram line names"
                    ));
                }
            }
        }
        for l in &lines {
            for w in camel_words(l) {
                if !states.iter().any(|(v, _)| v == w) {
                    wrong.push(format!(
                        "the {section} diagram names `{w}`, which is no {e}"
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the state diagrams in colo-core/src/engine/mod.rs do not match the code: {wrong:#?}"
    );
}

/// The TCP aligner's lifecycle diagram (colo-core/src/align.rs, `# Lifecycle of a connection`)
/// names every `ConnState` with the fields it carries on the same line, and no other state.
#[test]
fn the_alignment_diagram_names_every_connection_state() {
    let text = read("colo-core/src/align.rs");
    let docs: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let section = &docs[docs
        .find("# Lifecycle of a connection")
        .expect("a `# Lifecycle of a connection` section")..];
    let block = section.split("```").nth(1).expect("a diagram block");
    let states = variants(&text, "ConnState");
    assert!(states.len() >= 4, "ConnState: only {states:?} found");
    let mut wrong = Vec::new();
    for (v, fields) in &states {
        let Some(line) = block.lines().find(|l| camel_words(l).contains(&v.as_str())) else {
            wrong.push(format!("ConnState::{v} is missing from the diagram"));
            continue;
        };
        for f in fields {
            if !line.contains(f.as_str()) {
                wrong.push(format!(
                    "ConnState::{v} carries `{f}`, which its diagram line lacks"
                ));
            }
        }
    }
    for w in block.lines().flat_map(camel_words) {
        if !states.iter().any(|(v, _)| v == w) {
            wrong.push(format!("the diagram names `{w}`, which is no ConnState"));
        }
    }
    assert!(
        wrong.is_empty(),
        "the alignment diagram in colo-core/src/align.rs does not match the code: {wrong:#?}"
    );
}
