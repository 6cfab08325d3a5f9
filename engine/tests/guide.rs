//! The operator guide (docs/gateway.md) and `lu2k-engine --help` agree: every
//! `lu2k-engine` flag the guide names exists for the subcommand it is given to,
//! every other `--flag` in the guide's prose is the engine's or the userspace
//! kshim's, and the guide's flag table lists exactly the flags of
//! `lu2k-engine run`. (scripts/check-docs.sh runs the guide's commands.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const SUBCOMMANDS: [&str; 4] = ["run", "probe", "stats", "check-config"];

fn guide() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/gateway.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The long flags (`--name`) in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at;
        let mut end = start + 2;
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'-') {
            end += 1;
        }
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'-');
        if before_ok && end > start + 2 && !text[start..end].ends_with('-') {
            out.insert(text[start..end].to_string());
        }
        i = end.max(start + 2);
    }
    out
}

/// The long flags a `--help` text offers.
fn help_flags(bin: &Path, args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} --help failed",
        bin.display()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            // `-c, --config`: the short form first.
            let l = match l.as_bytes() {
                [b'-', c, b',', b' ', ..] if c.is_ascii_alphabetic() => &l[4..],
                _ => l,
            };
            l.starts_with("--")
                .then(|| l.split([' ', ',', '=']).next().unwrap().to_string())
        })
        .collect()
}

fn engine() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lu2k-engine"))
}

/// The userspace kshim's binary, where the workspace build made one.
fn kshim() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_lu2k-engine"));
    let p = dir.parent()?.join("lu2k-kshim");
    p.exists().then_some(p)
}

/// Lines of the guide's code blocks, whole (continuations joined), and the
/// lines outside them.
fn split_lines(text: &str) -> (Vec<String>, Vec<&str>) {
    let mut out = Vec::new();
    let mut prose = Vec::new();
    let mut inside = false;
    let mut cur = String::new();
    for l in text.lines() {
        if l.starts_with("```") {
            inside = !inside;
            continue;
        }
        if !inside {
            prose.push(l);
            continue;
        }
        if let Some(part) = l.strip_suffix('\\') {
            cur.push_str(part);
            continue;
        }
        cur.push_str(l);
        out.push(std::mem::take(&mut cur));
    }
    (out, prose)
}

/// Whether word `i` of a shell line is in command position.
fn command_at(words: &[&str], i: usize) -> bool {
    i == 0 || ["|", "&&", ";", "||", "then", "do"].contains(&words[i - 1])
}

/// The words of a command from `i + 1` to the end of its pipeline stage.
fn args_of<'a, 'b>(words: &'b [&'a str], i: usize) -> &'b [&'a str] {
    let end = words[i + 1..]
        .iter()
        .position(|w| ["|", ">", ">>", "&&", ";", "&", "2>&1"].contains(w))
        .map_or(words.len(), |p| i + 1 + p);
    &words[i + 1..end]
}

#[test]
fn guide_flags_match_the_cli() {
    let text = guide();
    let bin = engine();
    let global = help_flags(&bin, &[]);
    let mut engine_all = global.clone();
    for sub in SUBCOMMANDS {
        engine_all.extend(help_flags(&bin, &[sub]));
    }

    let kshim_flags = kshim().map(|k| {
        let mut f = help_flags(&k, &[]);
        for sub in ["put", "sink", "ping"] {
            f.extend(help_flags(&k, &[sub]));
        }
        f
    });
    if kshim_flags.is_none() {
        eprintln!(
            "SKIP part of guide_flags_match_the_cli: no lu2k-kshim binary beside the engine's \
             (cargo build --release -p lu2k-kshim); its flags are not checked"
        );
    }

    // Commands: each flag given to `lu2k-engine SUB` is SUB's (or global), each
    // given to `lu2k-kshim` the kshim's.
    let (code, prose) = split_lines(&text);
    let mut checked = 0;
    for line in &code {
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if !command_at(&words, i) {
                continue;
            }
            if w.ends_with("lu2k-kshim") {
                if let Some(k) = &kshim_flags {
                    for f in flags(&args_of(&words, i).join(" ")) {
                        assert!(
                            k.contains(&f),
                            "the guide runs `{line}`: lu2k-kshim has no {f}"
                        );
                    }
                }
                continue;
            }
            if !w.ends_with("lu2k-engine") {
                continue;
            }
            let sub = words[i + 1..]
                .iter()
                .find(|w| !w.starts_with('-'))
                .filter(|w| SUBCOMMANDS.contains(w));
            let mut known = global.clone();
            if let Some(sub) = sub {
                known.extend(help_flags(&bin, &[sub]));
            }
            for f in flags(&args_of(&words, i).join(" ")) {
                assert!(
                    known.contains(&f),
                    "the guide runs `{line}`, but lu2k-engine {} has no {f}",
                    sub.unwrap_or(&"")
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 4,
        "only {checked} flags on lu2k-engine command lines"
    );

    // Prose: the engine's or the kshim's (lnetctl's own are its business).
    for line in prose.iter().filter(|l| !l.contains("lnetctl")) {
        for f in flags(line) {
            let ok = engine_all.contains(&f) || kshim_flags.as_ref().is_none_or(|k| k.contains(&f));
            assert!(
                ok,
                "the guide names {f}, which neither lu2k-engine nor lu2k-kshim has: {line}"
            );
        }
    }

    // The flag table: exactly `lu2k-engine run`'s flags.
    let table_start = text
        .find("## `lu2k-engine run` flags")
        .expect("the guide's flag table");
    let table: BTreeSet<String> = text[table_start..]
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .flat_map(|l| flags(l.split('|').nth(1).unwrap()))
        .collect();
    let mut run: BTreeSet<String> = help_flags(&bin, &["run"]);
    run.remove("--help");
    let missing: Vec<_> = run.difference(&table).collect();
    let extra: Vec<_> = table.difference(&run).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the guide's flag table and `lu2k-engine run --help` differ: not in the guide \
         {missing:?}, not in the CLI {extra:?}"
    );
}

/// Every ```sh block has a fence scripts/check-docs.sh knows (it runs them).
#[test]
fn guide_blocks_have_known_fences() {
    let text = guide();
    let known = [
        "gateway-a",
        "gateway-b",
        "both",
        "gateway-a systemd",
        "gateway-b systemd",
        "lustre",
    ];
    let fences: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("```sh"))
        .map(str::trim)
        .collect();
    assert!(fences.len() >= 10, "{fences:?}");
    for f in &fences {
        assert!(
            known.contains(f),
            "```sh {f}: not a fence check-docs.sh runs"
        );
    }
    // The guide covers what an operator needs, each with commands.
    for section in [
        "## The picture",
        "## LNet routes through the gateways",
        "## Sizing a path",
        "## Install",
        "## First start and checks",
        "## Metrics, dashboard, alerts",
        "## Tuning",
        "## Troubleshooting by symptom",
        "## Upgrade",
    ] {
        assert!(text.contains(section), "missing {section}");
    }
    for symptom in [
        "**The link is up but no traffic.**",
        "**Slow.**",
        "**Peer flapping.**",
    ] {
        assert!(text.contains(symptom), "missing {symptom}");
    }
}
