//! ABI layout tests: every size, alignment, field offset and field size of every shared
//! record, checked in Rust against the values below and against what a C compiler makes
//! of `include/lu2k_ring.h` (a generated C program prints them; requires `cc`, which
//! `scripts/setup.sh` installs). Constants and `shard` are compared with C too.
#![cfg(not(loom))]

use core::mem::{align_of, offset_of, size_of};
use std::collections::BTreeMap;
use std::process::Command;

use lu2k_ring_abi::layout::{
    ControlBlock, CoreEntry, IndexLine, RegionHeader, RingInfo, INLINE_EXTENTS, MAGIC, MAX_CORES,
    MAX_PAYLOAD, MAX_RING_ENTRIES, MAX_RX_EXTENTS, MAX_TX_EXTENTS, RX_TABLE_BYTES, VERSION_MAJOR,
    VERSION_MINOR,
};
use lu2k_ring_abi::{
    doorbell, shard, Extent, Features, Nid, Pool, RxDesc, RxFlags, RxReturn, TxCompletion, TxDesc,
    TxFlags, TxStatus,
};

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// One record: its C name, size, alignment, and (field, offset, size) for every field.
struct Record {
    c_name: &'static str,
    size: usize,
    align: usize,
    fields: Vec<(&'static str, usize, usize)>,
}

macro_rules! record {
    ($ty:ty, $c:literal, [$($f:ident),* $(,)?]) => {
        Record {
            c_name: $c,
            size: size_of::<$ty>(),
            align: align_of::<$ty>(),
            fields: vec![$((stringify!($f), offset_of!($ty, $f), field_size(|s: &$ty| &s.$f))),*],
        }
    };
}

fn records() -> Vec<Record> {
    vec![
        record!(
            RegionHeader,
            "lu2k_region_header",
            [
                magic,
                version_major,
                version_minor,
                header_size,
                total_size,
                features,
                cores,
                core_entry_size,
                core_table_off,
                tx_pool_off,
                tx_pool_len,
                rx_pool_off,
                rx_pool_len,
                rx_buf_size,
                rx_buf_count,
                rx_tables_off,
                rx_tables_len,
                conns_per_peer,
                reserved0,
                reserved,
            ]
        ),
        record!(RingInfo, "lu2k_ring_info", [off, entries, slot_size]),
        record!(
            CoreEntry,
            "lu2k_core_entry",
            [
                ctrl_off,
                rx_tables_off,
                rx_tables,
                reserved0,
                reserved1,
                tx,
                tx_done,
                rx,
                rx_return,
            ]
        ),
        record!(IndexLine, "lu2k_index_line", [value, pad]),
        record!(
            ControlBlock,
            "lu2k_control_block",
            [
                tx_prod,
                tx_cons,
                tx_done_prod,
                tx_done_cons,
                rx_prod,
                rx_cons,
                rx_return_prod,
                rx_return_cons,
                to_engine_need_wakeup,
                to_engine_futex,
                to_kshim_need_wakeup,
                to_kshim_futex,
            ]
        ),
        record!(Extent, "lu2k_extent", [pool, flags, len, offset]),
        record!(
            Nid,
            "lu2k_nid",
            [size, reserved0, lnd, num, reserved1, addr]
        ),
        record!(
            TxDesc,
            "lu2k_tx_desc",
            [cookie, peer_nid, hdr, flags, nfrags, total_len, ext, reserved]
        ),
        record!(
            RxDesc,
            "lu2k_rx_desc",
            [token, src_nid, hdr, flags, nfrags, total_len, ext, reserved]
        ),
        record!(TxCompletion, "lu2k_tx_completion", [cookie, status, detail]),
        record!(RxReturn, "lu2k_rx_return", [token]),
    ]
}

/// The values the ABI promises, as "key value" pairs.
fn rust_values() -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in records() {
        m.insert(format!("sizeof {}", r.c_name), r.size as u64);
        m.insert(format!("alignof {}", r.c_name), r.align as u64);
        for (f, off, sz) in &r.fields {
            m.insert(format!("offsetof {}.{}", r.c_name, f), *off as u64);
            m.insert(format!("fieldsize {}.{}", r.c_name, f), *sz as u64);
        }
    }
    let consts: &[(&str, u64)] = &[
        ("LU2K_MAGIC", MAGIC),
        ("LU2K_VERSION_MAJOR", VERSION_MAJOR.into()),
        ("LU2K_VERSION_MINOR", VERSION_MINOR.into()),
        ("LU2K_MAX_CORES", MAX_CORES.into()),
        ("LU2K_MAX_RING_ENTRIES", MAX_RING_ENTRIES.into()),
        ("LU2K_MAX_PAYLOAD", MAX_PAYLOAD.into()),
        ("LU2K_MAX_TX_EXTENTS", MAX_TX_EXTENTS.into()),
        ("LU2K_MAX_RX_EXTENTS", MAX_RX_EXTENTS.into()),
        ("LU2K_INLINE_EXTENTS", INLINE_EXTENTS as u64),
        ("LU2K_RX_TABLE_BYTES", RX_TABLE_BYTES),
        ("LU2K_FEAT_FUTEX_WAKE", Features::FUTEX_WAKE.bits()),
        ("LU2K_FEAT_RX_INDIRECT", Features::RX_INDIRECT.bits()),
        ("LU2K_POOL_TX", Pool::Tx as u64),
        ("LU2K_POOL_RX", Pool::Rx as u64),
        ("LU2K_POOL_RX_TABLES", Pool::RxTables as u64),
        ("LU2K_TX_INDIRECT", TxFlags::INDIRECT.bits().into()),
        ("LU2K_RX_INDIRECT", RxFlags::INDIRECT.bits().into()),
        ("LU2K_WAKE_EVENTFD", doorbell::WAKE_EVENTFD.into()),
        ("LU2K_WAKE_FUTEX", doorbell::WAKE_FUTEX.into()),
        ("LU2K_TX_OK", TxStatus::Ok as u64),
        ("LU2K_TX_PEER_UNREACHABLE", TxStatus::PeerUnreachable as u64),
        ("LU2K_TX_TIMED_OUT", TxStatus::TimedOut as u64),
        ("LU2K_TX_ABORTED", TxStatus::Aborted as u64),
        (
            "LU2K_TX_INVALID_DESCRIPTOR",
            TxStatus::InvalidDescriptor as u64,
        ),
        ("LU2K_TX_NO_RESOURCES", TxStatus::NoResources as u64),
        ("LU2K_TX_ENGINE_GONE", TxStatus::EngineGone as u64),
        ("LU2K_TX_PEER_RESET", TxStatus::PeerReset as u64),
        ("LU2K_TX_SHUTDOWN", TxStatus::Shutdown as u64),
    ];
    for (k, v) in consts {
        m.insert(format!("const {k}"), *v);
    }
    for (nid, cores) in shard_samples() {
        m.insert(format!("shard {nid} {cores}"), shard(nid, cores).into());
    }
    for (home, cores, n, cookie) in stripe_samples() {
        m.insert(
            format!("stripe {home} {cores} {n} {cookie:#x}"),
            lu2k_ring_abi::stripe(home, cores, n, cookie).into(),
        );
    }
    m
}

fn stripe_samples() -> Vec<(u32, u32, u32, u64)> {
    let mut v = Vec::new();
    for (home, cores) in [(0u32, 1u32), (1, 2), (3, 4), (5, 7), (0, 0), (200, 16)] {
        for n in [0u32, 1, 2, 3, 4, 64] {
            for cookie in [0u64, 1, (7 << 32) | 3, u64::MAX, 0xDEAD_BEEF_0000_0011] {
                v.push((home, cores, n, cookie));
            }
        }
    }
    v
}

fn shard_samples() -> Vec<(Nid, u32)> {
    let mut v = Vec::new();
    let mut nids: Vec<Nid> = [
        0u64,
        1,
        0xC0A8_0105,
        0x0005_0002_0A00_0001,
        u64::MAX,
        0x1234_5678_9ABC_DEF0,
    ]
    .into_iter()
    .map(Nid::from_nid4)
    .collect();
    for s in [
        "2001:db8::1@lu2k",
        "fd00:1:2:3:4:5:6:7@tcp3",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff@lu2k",
        "::1@lu2k",
    ] {
        nids.push(s.parse().unwrap());
    }
    for nid in nids {
        for cores in [0u32, 1, 2, 3, 7, 16, 256] {
            v.push((nid, cores));
        }
    }
    v
}

/// A C compound literal of `nid`.
fn c_nid(nid: &Nid) -> String {
    let addr: Vec<String> = nid.addr.iter().map(|b| b.to_string()).collect();
    format!(
        "&(struct lu2k_nid){{ .size = {}, .lnd = {}, .num = {}, .addr = {{ {} }} }}",
        nid.size,
        nid.lnd,
        nid.num,
        addr.join(", ")
    )
}

fn c_program() -> String {
    let mut s = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"lu2k_ring.h\"\n\
         #define P(k, v) printf(\"%s %llu\\n\", k, (unsigned long long)(v))\n\
         int main(void) {\n",
    );
    for r in records() {
        let t = format!("struct {}", r.c_name);
        s += &format!("P(\"sizeof {0}\", sizeof({t}));\n", r.c_name);
        s += &format!("P(\"alignof {0}\", _Alignof({t}));\n", r.c_name);
        for (f, _, _) in &r.fields {
            s += &format!("P(\"offsetof {0}.{f}\", offsetof({t}, {f}));\n", r.c_name);
            s += &format!(
                "P(\"fieldsize {0}.{f}\", sizeof((({t} *)0)->{f}));\n",
                r.c_name
            );
        }
    }
    for k in rust_values().keys() {
        if let Some(c) = k.strip_prefix("const ") {
            s += &format!("P(\"{k}\", {c});\n");
        }
    }
    for (nid, cores) in shard_samples() {
        s += &format!(
            "P(\"shard {nid} {cores}\", lu2k_shard({}, {cores}u));\n",
            c_nid(&nid)
        );
    }
    for (home, cores, n, cookie) in stripe_samples() {
        s += &format!(
            "P(\"stripe {home} {cores} {n} {cookie:#x}\", lu2k_stripe({home}u, {cores}u, {n}u, {cookie:#x}ULL));\n"
        );
    }
    s += "return 0;\n}\n";
    s
}

#[test]
fn record_sizes_are_the_abi() {
    assert_eq!(size_of::<RegionHeader>(), 256);
    assert_eq!(size_of::<CoreEntry>(), 96);
    assert_eq!(size_of::<RingInfo>(), 16);
    assert_eq!(size_of::<IndexLine>(), 64);
    assert_eq!(align_of::<IndexLine>(), 64);
    assert_eq!(size_of::<ControlBlock>(), 12 * 64);
    assert_eq!(size_of::<Extent>(), 16);
    assert_eq!(size_of::<Nid>(), 24);
    assert_eq!(size_of::<TxDesc>(), 192);
    assert_eq!(align_of::<TxDesc>(), 64);
    assert_eq!(size_of::<RxDesc>(), 192);
    assert_eq!(align_of::<RxDesc>(), 64);
    assert_eq!(size_of::<TxCompletion>(), 16);
    assert_eq!(size_of::<RxReturn>(), 8);
    assert_eq!(MAGIC.to_le_bytes(), *b"LU2KRING");
}

#[test]
fn every_record_is_fully_described_without_hidden_padding() {
    // The field lists above cover every byte: field sizes add up to the record size and
    // each field starts where the previous one ended. So a field added in Rust but not
    // listed here (and thus not checked against C) fails this test.
    for r in records() {
        let mut end = 0;
        for (f, off, sz) in &r.fields {
            assert_eq!(
                *off, end,
                "{}.{f} does not follow the previous field",
                r.c_name
            );
            end = off + sz;
        }
        assert_eq!(end, r.size, "{}: fields do not fill the record", r.c_name);
    }
    // Spot checks of the documented offsets.
    assert_eq!(offset_of!(TxDesc, peer_nid), 8);
    assert_eq!(offset_of!(TxDesc, hdr), 32);
    assert_eq!(offset_of!(TxDesc, flags), 104);
    assert_eq!(offset_of!(TxDesc, ext), 112);
    assert_eq!(offset_of!(RxDesc, ext), 112);
    assert_eq!(offset_of!(Nid, addr), 8);
    assert_eq!(offset_of!(ControlBlock, tx_cons), 64);
    assert_eq!(offset_of!(ControlBlock, to_kshim_futex), 11 * 64);
    assert_eq!(offset_of!(CoreEntry, tx), 32);
}

#[test]
fn c_header_agrees_with_rust_on_every_size_offset_and_constant() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lu2k-ring-abi-c");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, c_program()).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I", include])
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run C compiler `{cc}` ({e}); run scripts/setup.sh"));
    assert!(
        out.status.success(),
        "C compile failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let c: BTreeMap<String, u64> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    let rust = rust_values();
    assert_eq!(c.len(), rust.len(), "C printed a different set of keys");
    let mismatches: Vec<String> = rust
        .iter()
        .filter(|(k, v)| c.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: rust {v}, C {:?}", c.get(k)))
        .collect();
    assert!(
        mismatches.is_empty(),
        "C and Rust disagree:\n{}",
        mismatches.join("\n")
    );
    // Not vacuous: the comparison covered every record field.
    assert!(rust.keys().filter(|k| k.starts_with("offsetof ")).count() > 60);
}
