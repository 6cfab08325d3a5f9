//! The `lu2k-kshim` binary end to end: two real `lu2k-kshim` processes (put and sink,
//! or ping and sink), joined by a small bridge engine in this test that attaches to
//! both over their Unix sockets, takes each side's TX descriptors and publishes them
//! as RX descriptors into the other side's RX pool (the wire replaced by a copy), and
//! recycles RX buffers when they are returned. The bridge is the real ABI's other side;
//! only the network is left out.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lu2k_kshim::attach;
use lu2k_kshim::ring_abi::{
    doorbell::WaitMode, layout::RX_TABLE_BYTES, EngineCore, Eventfds, Extent, ExtentBuf, Pool,
    Region, RxDesc, TxCompletion, TxDesc, TxStatus,
};

const BIN: &str = env!("CARGO_BIN_EXE_lu2k-kshim");

fn sock(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lu2k-kshim-cli-{}-{name}.sock", std::process::id()))
}

struct Side {
    _att: attach::Attachment,
    region: Region,
    cores: Vec<EngineCore>,
    free_bufs: Vec<u32>,
    free_tables: Vec<Vec<u64>>,
    /// token -> (buffers, core, table)
    held: HashMap<u64, (Vec<u32>, u32, Option<u64>)>,
    next_token: u64,
    /// TX descriptors waiting for the other side's RX space: (core, desc).
    waiting: VecDeque<(u32, TxDesc)>,
}

impl Side {
    fn attach(path: &Path) -> Side {
        let t0 = Instant::now();
        let mut att = loop {
            match attach::connect(path) {
                Ok(a) => break a,
                Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("attach {}: {e}", path.display()),
            }
        };
        let region = Region::from_fd(att.memfd.try_clone().unwrap()).unwrap();
        let te = std::mem::take(&mut att.to_engine);
        let tk = std::mem::take(&mut att.to_kshim);
        let cores: Vec<EngineCore> = te
            .into_iter()
            .zip(tk)
            .enumerate()
            .map(|(c, (a, b))| {
                region
                    .engine_core(
                        c as u32,
                        Eventfds {
                            to_engine: Some(a),
                            to_kshim: Some(b),
                        },
                    )
                    .unwrap()
            })
            .collect();
        let h = *region.layout().header();
        let free_bufs = (0..h.rx_buf_count).rev().collect();
        let free_tables = region
            .layout()
            .core_entries()
            .iter()
            .map(|c| {
                (0..u64::from(c.rx_tables))
                    .map(|i| c.rx_tables_off - h.rx_tables_off + i * RX_TABLE_BYTES)
                    .collect()
            })
            .collect();
        att.ack(0).unwrap();
        Side {
            _att: att,
            region,
            cores,
            free_bufs,
            free_tables,
            held: HashMap::new(),
            next_token: 1,
            waiting: VecDeque::new(),
        }
    }

    fn take_returns(&mut self) {
        for c in self.cores.iter_mut() {
            while let Some(r) = c.rx_return.pop().unwrap() {
                let (bufs, core, table) = self.held.remove(&r.token).expect("known token");
                self.free_bufs.extend(bufs);
                if let Some(t) = table {
                    self.free_tables[core as usize].push(t);
                }
            }
        }
    }

    /// Copies `payload` into this side's RX pool and publishes it; false if no room.
    fn deliver(
        &mut self,
        src_nid: lu2k_kshim::Nid,
        hdr: [u8; 72],
        payload: &[u8],
        corrupt: bool,
    ) -> bool {
        let h = *self.region.layout().header();
        let bsz = h.rx_buf_size as usize;
        let need = payload.len().div_ceil(bsz);
        let core = lu2k_kshim::ring_abi::shard(src_nid, self.cores.len() as u32);
        let indirect = need > 2;
        if self.free_bufs.len() < need || (indirect && self.free_tables[core as usize].is_empty()) {
            return false;
        }
        let mut bufs = Vec::new();
        let mut exts = Vec::new();
        for piece in payload.chunks(bsz) {
            let b = self.free_bufs.pop().unwrap();
            let (off, _) = self.region.layout().rx_buffer(b).unwrap();
            self.region.write_pool(Pool::Rx, off, piece).unwrap();
            bufs.push(b);
            exts.push(Extent::new(Pool::Rx, off, piece.len() as u32));
        }
        if corrupt && !payload.is_empty() {
            let e = exts[exts.len() / 2];
            let mut byte = [self
                .region
                .pool_bytes(&Extent::new(Pool::Rx, e.offset, 1))
                .unwrap()[0]];
            byte[0] ^= 0x40;
            self.region.write_pool(Pool::Rx, e.offset, &byte).unwrap();
        }
        let token = self.next_token;
        self.next_token += 1;
        let (d, table) = if indirect {
            let t = self.free_tables[core as usize].pop().unwrap();
            self.region.write_extents(Pool::RxTables, t, &exts).unwrap();
            let d = RxDesc::indirect(
                token,
                src_nid,
                hdr,
                t,
                exts.len() as u16,
                payload.len() as u32,
            );
            (d, Some(t))
        } else {
            (RxDesc::inline(token, src_nid, hdr, &exts), None)
        };
        let c = &mut self.cores[core as usize];
        if !c.rx.push(d).unwrap() {
            // RX ring full: undo.
            self.free_bufs.extend(bufs);
            if let Some(t) = table {
                self.free_tables[core as usize].push(t);
            }
            return false;
        }
        c.to_kshim.notify().unwrap();
        self.held.insert(token, (bufs, core, table));
        true
    }
}

/// Moves every TX descriptor of `from` into `to`'s RX ring, completing it Ok on `from`.
fn pump(from: &mut Side, to: &mut Side, corrupt_at: u64, moved: &AtomicU64) -> bool {
    let mut any = false;
    for c in from.cores.iter_mut() {
        while let Some(d) = c.tx.pop().unwrap() {
            from.waiting.push_back((c.core, d));
        }
    }
    to.take_returns();
    let mut scratch = ExtentBuf::new();
    while let Some(&(core, d)) = from.waiting.front() {
        let v = from
            .region
            .validate_tx(&d, &mut scratch)
            .expect("kshim's descriptors are valid");
        let mut payload = Vec::with_capacity(v.total_len as usize);
        for e in v.extents {
            payload.extend_from_slice(from.region.pool_bytes(e).unwrap());
        }
        // The source NID is the sender's (the header's src); fine for a two-node bridge.
        let src = lu2k_kshim::Nid::from_nid4(u64::from_le_bytes(d.hdr[8..16].try_into().unwrap()));
        let n = moved.load(Ordering::Relaxed);
        if !to.deliver(src, d.hdr, &payload, n == corrupt_at) {
            break;
        }
        moved.fetch_add(1, Ordering::Relaxed);
        from.waiting.pop_front();
        let c = &mut from.cores[core as usize];
        while !c
            .tx_done
            .push(TxCompletion::new(d.cookie, TxStatus::Ok, 0))
            .unwrap()
        {
            thread::yield_now();
        }
        c.to_kshim.notify().unwrap();
        any = true;
    }
    any
}

struct Bridge {
    stop: Arc<AtomicBool>,
    moved: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Bridge {
    /// `corrupt_at`: flip one payload byte of the message with this index (u64::MAX: none).
    fn start(a: PathBuf, b: PathBuf, corrupt_at: u64) -> Bridge {
        let stop = Arc::new(AtomicBool::new(false));
        let moved = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), moved.clone());
        let thread = thread::spawn(move || {
            let mut a = Side::attach(&a);
            let mut b = Side::attach(&b);
            while !s.load(Ordering::Relaxed) {
                let x = pump(&mut a, &mut b, corrupt_at, &m);
                let y = pump(&mut b, &mut a, corrupt_at, &m);
                if !x && !y {
                    // Idle: sleep on a's doorbell briefly (b is checked each round).
                    let c = &mut a.cores[0];
                    let tx = &mut c.tx;
                    let _ = c
                        .wait
                        .wait(WaitMode::Eventfd, Some(Duration::from_millis(2)), || {
                            !tx.is_empty().unwrap()
                        });
                }
            }
        });
        Bridge {
            stop,
            moved,
            thread: Some(thread),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(c: Child, what: &str) -> Output {
    let out = c.wait_with_output().unwrap();
    eprintln!(
        "--- {what}: {}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn common<'a>(sock: &'a str, nid: &'a str) -> Vec<&'a str> {
    vec![
        "--socket",
        sock,
        "--nid",
        nid,
        "--progress",
        "0",
        "--attach-wait",
        "30",
        "--tx-pool",
        "32M",
    ]
}

/// `sink SINK_ARGS` and `put --to 10.0.0.1@lu2k PUT_ARGS` joined by a clean bridge;
/// both must succeed. Returns their standard outputs.
fn put_into_sink(tag: &str, sink_extra: &[&str], put_extra: &[&str]) -> (String, String) {
    let (sa, sb) = (sock(&format!("{tag}-a")), sock(&format!("{tag}-b")));
    let (a, b) = (sa.to_str().unwrap(), sb.to_str().unwrap());
    let mut sink_args = common(a, "10.0.0.1@lu2k");
    sink_args.push("sink");
    sink_args.extend(sink_extra);
    let sink = spawn(&sink_args);
    let mut put_args = common(b, "10.0.0.2@lu2k");
    put_args.extend(["put", "--to", "10.0.0.1@lu2k"]);
    put_args.extend(put_extra);
    let put = spawn(&put_args);
    let bridge = Bridge::start(sa.clone(), sb.clone(), u64::MAX);
    let put_out = finish(put, "put");
    let sink_out = finish(sink, "sink");
    drop(bridge);
    assert!(put_out.status.success());
    assert!(sink_out.status.success());
    (
        String::from_utf8_lossy(&put_out.stdout).into_owned(),
        String::from_utf8_lossy(&sink_out.stdout).into_owned(),
    )
}

#[test]
fn put_to_sink_verifies_every_byte() {
    let (p, s) = put_into_sink(
        "put-sink",
        &["--count", "40"],
        &["--size", "300K", "--count", "40"],
    );
    assert!(
        s.contains("40 PUTs (40 verified, 0 corrupt), 12288000 bytes"),
        "{s}"
    );
    assert!(p.contains("40 ok, 0 failed"), "{p}");
}

#[test]
fn put_no_fill_to_sink_no_verify_counts_without_checking() {
    let (p, s) = put_into_sink(
        "nofill",
        &["--count", "20", "--no-verify"],
        &["--size", "64K", "--count", "20", "--no-fill"],
    );
    assert!(
        s.contains("20 PUTs (0 verified, 0 corrupt), 1310720 bytes"),
        "{s}"
    );
    assert!(p.contains("20 ok, 0 failed"), "{p}");
}

#[test]
fn sink_detects_corruption() {
    let (sa, sb) = (sock("corrupt-a"), sock("corrupt-b"));
    let (a, b) = (sa.to_str().unwrap(), sb.to_str().unwrap());
    let mut sink_args = common(a, "10.0.0.1@lu2k");
    sink_args.extend(["sink", "--count", "10"]);
    let sink = spawn(&sink_args);
    let mut put_args = common(b, "10.0.0.2@lu2k");
    put_args.extend([
        "put",
        "--to",
        "10.0.0.1@lu2k",
        "--size",
        "100K",
        "--count",
        "10",
    ]);
    let put = spawn(&put_args);
    let bridge = Bridge::start(sa.clone(), sb.clone(), 3);
    let put_out = finish(put, "put");
    let sink_out = finish(sink, "sink");
    assert_eq!(bridge.moved.load(Ordering::Relaxed), 10);
    drop(bridge);
    assert!(put_out.status.success());
    assert_eq!(
        sink_out.status.code(),
        Some(1),
        "sink must fail on a corrupt payload"
    );
    let s = String::from_utf8_lossy(&sink_out.stdout);
    assert!(s.contains("10 PUTs (9 verified, 1 corrupt)"), "{s}");
}

#[test]
fn ping_prints_latency_percentiles() {
    let (sa, sb) = (sock("ping-a"), sock("ping-b"));
    let (a, b) = (sa.to_str().unwrap(), sb.to_str().unwrap());
    let mut sink_args = common(a, "10.0.0.1@lu2k");
    sink_args.extend(["sink"]);
    let sink = spawn(&sink_args);
    let mut ping_args = common(b, "10.0.0.2@lu2k");
    ping_args.extend([
        "ping",
        "--to",
        "10.0.0.1@lu2k",
        "--size",
        "4K",
        "--count",
        "30",
    ]);
    let ping = spawn(&ping_args);
    let bridge = Bridge::start(sa.clone(), sb.clone(), u64::MAX);
    let ping_out = finish(ping, "ping");
    drop(bridge); // closes both sockets: the sink sees the engine go and exits
    let sink_out = finish(sink, "sink");
    let p = String::from_utf8_lossy(&ping_out.stdout);
    assert!(ping_out.status.success(), "{p}");
    assert!(p.contains("30 replies, 0 lost, 0 corrupt"), "{p}");
    assert!(
        p.contains("p50") && p.contains("p99") && p.contains("max"),
        "{p}"
    );
    let s = String::from_utf8_lossy(&sink_out.stdout);
    assert!(s.contains("30 GETs answered (0 replies failed)"), "{s}");
}
