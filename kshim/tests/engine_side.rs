//! The test plays the engine: it connects to kshim's real Unix socket, receives the
//! real memfd and eventfds with SCM_RIGHTS, maps the region with `Region::from_fd` and
//! drives the engine's ends of the rings with the ring-abi handles. No mocks: this is
//! the ABI's other side.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lu2k_kshim::attach::{self, Attachment, Notice};
use lu2k_kshim::hdr::{Msg, Repr, WireHandle};
use lu2k_kshim::ring_abi::{
    self, doorbell::WaitMode, EngineCore, Eventfds, Extent, ExtentBuf, Pool, Region, RxDesc,
    TxCompletion, TxDesc, TxStatus,
};
use lu2k_kshim::route::Route;
use lu2k_kshim::{selftest, Config, Cookie, Event, GoneReason, Kshim, Nid, SendError};

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "lu2k-kshim-test-{}-{name}.sock",
        std::process::id()
    ))
}

fn nid(s: &str) -> Nid {
    s.parse().unwrap()
}

struct Engine {
    att: Attachment,
    region: Region,
    cores: Vec<EngineCore>,
}

fn connect(path: &Path) -> Attachment {
    let t0 = Instant::now();
    loop {
        match attach::connect(path) {
            Ok(a) => return a,
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("cannot attach to {}: {e}", path.display()),
        }
    }
}

impl Engine {
    fn attach(path: &Path) -> Engine {
        let mut att = connect(path);
        let memfd = att.memfd.try_clone().unwrap();
        let region = Region::from_fd(memfd).expect("engine maps and validates the region");
        assert_eq!(region.len() as u64, att.hello.region_size);
        let mut cores = Vec::new();
        let to_engine = std::mem::take(&mut att.to_engine);
        let to_kshim = std::mem::take(&mut att.to_kshim);
        for (c, (te, tk)) in to_engine.into_iter().zip(to_kshim).enumerate() {
            let fds = Eventfds {
                to_engine: Some(te),
                to_kshim: Some(tk),
            };
            cores.push(region.engine_core(c as u32, fds).unwrap());
        }
        att.ack(0).unwrap();
        Engine { att, region, cores }
    }

    /// Waits (on the real doorbell) until some TX descriptor is there; returns them all.
    fn take_tx(&mut self, timeout: Duration) -> Vec<(u32, TxDesc)> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut out = Vec::new();
            for c in self.cores.iter_mut() {
                while let Some(d) = c.tx.pop().unwrap() {
                    out.push((c.core, d));
                }
            }
            if !out.is_empty() || Instant::now() >= deadline {
                return out;
            }
            // Sleep on core 0's doorbell for a bit (other cores: short timeout poll).
            let c = &mut self.cores[0];
            let tx = &mut c.tx;
            let _ = c
                .wait
                .wait(WaitMode::Eventfd, Some(Duration::from_millis(20)), || {
                    !tx.is_empty().unwrap()
                });
        }
    }

    fn complete(&mut self, core: u32, cookie: u64, status: TxStatus) {
        let c = &mut self.cores[core as usize];
        assert!(c
            .tx_done
            .push(TxCompletion::new(cookie, status, 0))
            .unwrap());
        c.to_kshim.notify().unwrap();
    }

    fn payload(&self, d: &TxDesc) -> Vec<u8> {
        let mut scratch = ExtentBuf::new();
        let v = self
            .region
            .validate_tx(d, &mut scratch)
            .expect("kshim writes valid descriptors");
        let mut out = Vec::with_capacity(v.total_len as usize);
        for e in v.extents {
            out.extend_from_slice(self.region.pool_bytes(e).unwrap());
        }
        out
    }
}

fn put(dest: Nid, src: Nid, seed: u64, len: usize) -> Repr {
    Repr {
        // LNet's header holds 64-bit NIDs; an IPv6 one travels beside it (send_to).
        dest_nid: dest.nid4().unwrap_or(u64::MAX),
        src_nid: src.nid4().unwrap_or(u64::MAX),
        dest_pid: 12345,
        src_pid: 12345,
        payload_length: len as u32,
        msg: Msg::Put {
            ack_wmd: WireHandle {
                interface_cookie: u64::MAX,
                object_cookie: u64::MAX,
            },
            match_bits: seed,
            hdr_data: seed,
            ptl_index: 4,
            offset: 0,
        },
    }
}

fn base_config(name: &str) -> Config {
    let mut cfg = Config::new(vec![nid("10.0.0.1@lu2k")], sock_path(name));
    cfg.tx_pool_len = 16 << 20;
    cfg.tx_entries = 64;
    cfg.tx_done_entries = 64;
    cfg.rx_entries = 64;
    cfg.rx_return_entries = 64;
    cfg.rx_buf_size = 4096;
    cfg.rx_buf_count = 256;
    cfg.rx_tables_per_core = 4;
    cfg.credits = 512;
    cfg.peer_credits = 64;
    cfg.max_pending = 1024;
    cfg
}

fn drain_until(
    k: &mut Kshim,
    mut done: impl FnMut(&Event) -> bool,
    timeout: Duration,
) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        if let Some(e) = k.wait(Some(Duration::from_millis(50))) {
            let stop = done(&e);
            out.push(e);
            if stop {
                return out;
            }
        }
    }
    panic!("timed out; events so far: {out:?}");
}

/// Sends of many sizes over 2 cores (indices crossing the 2^32 wrap), content checked
/// by the engine, completions with chosen statuses, each cookie exactly once; credits
/// never exceeded; routed sends go to the gateway; bogus completions ignored; the TX
/// pool is whole at the end.
#[test]
fn sends_complete_exactly_once_with_statuses() {
    let mut cfg = base_config("sends");
    cfg.cores = 2;
    cfg.start_index = u32::MAX - 20;
    cfg.peer_credits = 4;
    cfg.tx_chunk_size = 4096;
    cfg.routes.push(Route {
        net: "o2ib7".parse().unwrap(),
        gateway: nid("10.0.0.254@lu2k"),
        hops: 2,
        priority: 0,
    });
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let chunk_total = k.tx_pool_free().0;

    let peers = [
        nid("10.0.0.2@lu2k"),
        nid("10.0.0.3@lu2k"),
        nid("10.0.0.4@lu2k"),
    ];
    let remote = nid("172.16.0.9@o2ib7");
    let gw = nid("10.0.0.254@lu2k");
    let sizes = [
        0usize,
        1,
        100,
        4096,
        4097,
        8192,
        12289,
        65536,
        300_000,
        1 << 20,
    ];
    let statuses = [
        TxStatus::Ok,
        TxStatus::Ok,
        TxStatus::TimedOut,
        TxStatus::Aborted,
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let engine = thread::spawn(move || {
        let mut e = Engine::attach(&path);
        let mut seen: HashSet<u64> = HashSet::new();
        let mut outstanding: HashMap<Nid, u32> = HashMap::new();
        let mut max_outstanding = 0u32;
        let mut n = 0u64;
        // Post a completion for a cookie kshim never issued: must be ignored.
        e.complete(0, 0xdead_beef_0000_0007, TxStatus::Ok);
        while !stop2.load(Ordering::Relaxed) {
            let batch = e.take_tx(Duration::from_millis(100));
            for (core, d) in &batch {
                assert!(seen.insert(d.cookie), "cookie {:#x} sent twice", d.cookie);
                assert_eq!(
                    *core,
                    ring_abi::shard(d.peer_nid, 2),
                    "descriptor on the wrong core"
                );
                let h = Repr::from_bytes(&d.hdr).unwrap();
                if h.dest_nid == remote.nid4().unwrap() {
                    assert_eq!(d.peer_nid, gw, "routed send must go to the gateway");
                } else {
                    assert_eq!(d.peer_nid, Nid::from_nid4(h.dest_nid));
                }
                let data = e.payload(d);
                assert_eq!(data.len(), h.payload_length as usize);
                let Msg::Put { hdr_data: seed, .. } = h.msg else {
                    panic!("not a PUT")
                };
                assert_eq!(selftest::check(seed, 0, &data), None, "payload corrupt");
                let o = outstanding.entry(d.peer_nid).or_default();
                *o += 1;
                max_outstanding = max_outstanding.max(*o);
            }
            // Complete everything taken, status chosen by the seed.
            for (core, d) in batch {
                let h = Repr::from_bytes(&d.hdr).unwrap();
                let Msg::Put { hdr_data: seed, .. } = h.msg else {
                    unreachable!()
                };
                *outstanding.get_mut(&d.peer_nid).unwrap() -= 1;
                e.complete(core, d.cookie, statuses[(seed % 4) as usize]);
                n += 1;
            }
        }
        (n, max_outstanding, e)
    });

    let mut expect: HashMap<Cookie, TxStatus> = HashMap::new();
    let mut seed = 0u64;
    let mut bad = 0;
    for round in 0..6 {
        for &size in &sizes {
            for p in peers.iter().copied().chain([remote]) {
                seed += 1;
                let h = put(p, nid("10.0.0.1@lu2k"), seed, size);
                let mut data = vec![0u8; size];
                selftest::fill(seed, 0, &mut data);
                let c = loop {
                    match k.send(&h, &data) {
                        Ok(c) => break c,
                        // Pool or pending limit: let completions come back.
                        Err(SendError::Pool(_)) | Err(SendError::TooManyPending { .. }) => {
                            if let Some(ev) = k.wait(Some(Duration::from_millis(10))) {
                                check_done(ev, &mut expect, &mut bad);
                            }
                        }
                        Err(e) => panic!("send: {e}"),
                    }
                };
                assert!(expect.insert(c, statuses[(seed % 4) as usize]).is_none());
            }
        }
        let _ = round;
    }
    // Refused sends produce no completion.
    let h = put(nid("1.2.3.4@tcp9"), nid("10.0.0.1@lu2k"), 0, 0);
    assert!(matches!(k.send(&h, &[]), Err(SendError::Route(_))));
    let h = put(peers[0], nid("10.0.0.1@lu2k"), 0, 5);
    assert!(matches!(
        k.send(&h, &[0; 4]),
        Err(SendError::LengthMismatch { .. })
    ));

    let deadline = Instant::now() + Duration::from_secs(30);
    while !expect.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} sends never completed",
            expect.len()
        );
        if let Some(ev) = k.wait(Some(Duration::from_millis(50))) {
            check_done(ev, &mut expect, &mut bad);
        }
    }
    assert_eq!(bad, 0);
    // Nothing more arrives: no duplicate completions.
    let extra = k.wait(Some(Duration::from_millis(200)));
    assert!(
        !matches!(extra, Some(Event::TxDone { .. })),
        "extra completion {extra:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let (n, max_out, _e) = engine.join().unwrap();
    assert_eq!(n, 6 * sizes.len() as u64 * 4);
    assert!(
        max_out <= 4,
        "peer credits exceeded: {max_out} in flight to one peer"
    );
    let st = k.stats();
    assert_eq!(st.bogus_completions, 1);
    assert_eq!(st.tx_ok + st.tx_failed, n);
    assert_eq!(k.pending(), 0);
    assert_eq!(k.tx_pool_free().0, chunk_total, "TX pool chunks leaked");
}

fn check_done(ev: Event, expect: &mut HashMap<Cookie, TxStatus>, bad: &mut u32) {
    match ev {
        Event::TxDone { cookie, status, .. } => {
            let want = expect
                .remove(&cookie)
                .unwrap_or_else(|| panic!("unknown or repeated {cookie:?}"));
            assert_eq!(status, want, "{cookie:?}");
        }
        Event::EngineAttached | Event::PeerDown(_) | Event::PeerUp(_) => {}
        other => {
            eprintln!("unexpected {other:?}");
            *bad += 1;
        }
    }
}

/// The engine publishes received messages (inline and indirect extents) into the RX
/// pool; kshim delivers header and payload in place; held messages are returned later
/// and their tokens reach the engine; a bad descriptor is not delivered but its token
/// still comes home; peer notices are delivered.
#[test]
fn rx_delivery_and_buffer_return() {
    let cfg = base_config("rx");
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u64>>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let engine = thread::spawn(move || {
        let mut e = Engine::attach(&path);
        let buf = 4096u64;
        let me = nid("10.0.0.1@lu2k");
        let from = nid("10.0.0.9@lu2k");
        // Messages: (payload len, extents in RX buffers).
        let sizes = [0usize, 10, 4096, 5000, 3 * 4096 + 17];
        let mut next_buf = 0u64;
        let mut tables = 0u64;
        let mut descs = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let token = 100 + i as u64;
            let seed = 1000 + i as u64;
            let mut data = vec![0u8; len];
            selftest::fill(seed, 0, &mut data);
            let mut exts = Vec::new();
            for piece in data.chunks(buf as usize) {
                let off = next_buf * buf + 64; // not at the buffer start, like a UDT payload
                let take = piece.len().min(buf as usize - 64);
                e.region.write_pool(Pool::Rx, off, &piece[..take]).unwrap();
                exts.push(Extent::new(Pool::Rx, off, take as u32));
                next_buf += 1;
                if take < piece.len() {
                    let off2 = next_buf * buf;
                    e.region.write_pool(Pool::Rx, off2, &piece[take..]).unwrap();
                    exts.push(Extent::new(Pool::Rx, off2, (piece.len() - take) as u32));
                    next_buf += 1;
                }
            }
            let h = put(me, from, seed, len).to_bytes();
            let d = if exts.len() <= 2 {
                RxDesc::inline(token, from, h, &exts)
            } else {
                // One RX table (16 KiB) per message: the engine's table area.
                let toff = tables * ring_abi::layout::RX_TABLE_BYTES;
                tables += 1;
                e.region.write_extents(Pool::RxTables, toff, &exts).unwrap();
                RxDesc::indirect(token, from, h, toff, exts.len() as u16, len as u32)
            };
            let mut scratch = ExtentBuf::new();
            e.region
                .validate_rx(&d, &mut scratch)
                .expect("test engine builds valid RX descriptors");
            descs.push(d);
        }
        // A descriptor pointing outside the RX pool: must not be delivered.
        let bad = RxDesc::inline(
            999,
            from,
            put(me, from, 1, 10).to_bytes(),
            &[Extent::new(Pool::Rx, 1 << 40, 10)],
        );
        descs.push(bad);
        let c = &mut e.cores[0];
        for d in descs {
            assert!(c.rx.push(d).unwrap());
        }
        c.to_kshim.notify().unwrap();
        e.att
            .notice(Notice::PeerDown(nid("10.0.0.77@lu2k")))
            .unwrap();
        // Collect returned tokens until kshim's side says it returned everything.
        go_rx.recv().unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 6 && Instant::now() < deadline {
            let c = &mut e.cores[0];
            while let Some(r) = c.rx_return.pop().unwrap() {
                got.push(r.token);
            }
            let rr = &mut c.rx_return;
            let _ = c
                .wait
                .wait(WaitMode::Eventfd, Some(Duration::from_millis(50)), || {
                    !rr.is_empty().unwrap()
                });
        }
        tx.send(got).unwrap();
        e
    });

    let mut msgs = Vec::new();
    let mut downs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (msgs.len() < 5 || downs.is_empty()) && Instant::now() < deadline {
        match k.wait(Some(Duration::from_millis(50))) {
            Some(Event::Rx(m)) => msgs.push(m),
            Some(Event::PeerDown(n)) => downs.push(n),
            Some(Event::EngineAttached) | Some(Event::PeerUp(_)) | None => {}
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(msgs.len(), 5, "all good messages delivered");
    assert_eq!(downs, [nid("10.0.0.77@lu2k")]);
    for (i, m) in msgs.iter().enumerate() {
        let seed = 1000 + i as u64;
        assert_eq!(m.from, nid("10.0.0.9@lu2k"));
        assert_eq!(m.hdr.payload_length as usize, m.len());
        let Msg::Put { hdr_data, .. } = m.hdr.msg else {
            panic!()
        };
        assert_eq!(hdr_data, seed);
        let mut at = 0;
        for s in m.slices() {
            assert_eq!(selftest::check(seed, at, s), None, "message {i} corrupt");
            at += s.len();
        }
        assert_eq!(at, m.len());
        let mut copy = vec![0u8; m.len()];
        assert_eq!(m.copy_to(&mut copy), m.len());
        assert_eq!(selftest::check(seed, 0, &copy), None);
    }
    assert_eq!(
        msgs[3].extents().len(),
        3,
        "indirect descriptor delivered all extents"
    );
    assert_eq!(
        msgs[4].extents().len(),
        7,
        "indirect descriptor delivered all extents"
    );
    assert_eq!(k.stats().bad_rx, 1);
    // Hold the messages a while, then return them out of order.
    thread::sleep(Duration::from_millis(50));
    msgs.reverse();
    for m in msgs {
        k.rx_done(m);
    }
    go_tx.send(()).unwrap();
    let mut got = rx.recv().unwrap();
    got.sort();
    assert_eq!(got, [100, 101, 102, 103, 104, 999]);
    assert_eq!(k.stats().rx_returned, 5);
    let _e = engine.join().unwrap();
}

/// A real engine process that attaches, takes every descriptor, completes the first
/// few and then is killed with SIGKILL: every other send fails back with EngineGone,
/// promptly, exactly once.
#[test]
fn engine_death_fails_inflight_sends() {
    let mut cfg = base_config("death");
    cfg.cores = 2;
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "engine_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LU2K_KSHIM_TEST_ENGINE", &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let peers = [
        nid("10.0.0.2@lu2k"),
        nid("10.0.0.3@lu2k"),
        nid("10.0.0.4@lu2k"),
    ];
    let mut cookies = HashSet::new();
    for i in 0..60u64 {
        let h = put(peers[(i % 3) as usize], nid("10.0.0.1@lu2k"), i, 1000);
        cookies.insert(k.send(&h, &[7u8; 1000]).unwrap());
    }
    // Wait for the child's 10 completions.
    let mut ok = 0;
    let mut attached = false;
    while ok < 10 {
        match k.wait(Some(Duration::from_secs(20))) {
            Some(Event::TxDone { cookie, status, .. }) => {
                assert_eq!(status, TxStatus::Ok);
                assert!(cookies.remove(&cookie));
                ok += 1;
            }
            Some(Event::EngineAttached) => attached = true,
            Some(Event::PeerUp(_)) | Some(Event::PeerDown(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(attached);
    child.kill().unwrap();
    let killed = Instant::now();
    let _ = child.wait();
    let mut gone = None;
    while gone.is_none() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "engine death not noticed"
        );
        match k.wait(Some(Duration::from_millis(100))) {
            Some(Event::TxDone { cookie, status, .. }) => {
                assert_eq!(status, TxStatus::EngineGone);
                assert!(cookies.remove(&cookie), "{cookie:?} completed twice");
            }
            Some(Event::EngineGone(r)) => gone = Some(r),
            Some(Event::PeerUp(_)) | Some(Event::PeerDown(_)) | None => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(gone, Some(GoneReason::SocketClosed));
    assert!(
        cookies.is_empty(),
        "{} sends never failed back",
        cookies.len()
    );
    assert_eq!(k.pending(), 0);
    // The next engine attaches to the same Kshim (a fresh region), and sends flow.
    assert!(!k.is_gone(), "kshim listens for the next engine");
    let h = put(peers[0], nid("10.0.0.1@lu2k"), 77, 1000);
    let c = k.send(&h, &[9u8; 1000]).unwrap();
    let engine = thread::spawn(move || {
        let mut e = Engine::attach(&path);
        let got = e.take_tx(Duration::from_secs(10));
        assert_eq!(got.len(), 1, "only the new send is in the fresh rings");
        let (core, d) = got[0];
        assert_eq!(e.payload(&d), [9u8; 1000]);
        e.complete(core, d.cookie, TxStatus::Ok);
        // Then a peer's full credit of sends at once: every one must reach the
        // rings, none held back by a credit the dead session kept.
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 64 && Instant::now() < deadline {
            got.extend(e.take_tx(Duration::from_millis(100)));
        }
        assert_eq!(got.len(), 64, "a peer's 64 credits, all free again");
        for (core, d) in got {
            e.complete(core, d.cookie, TxStatus::Ok);
        }
        e
    });
    let evs = drain_until(
        &mut k,
        |e| matches!(e, Event::TxDone { .. }),
        Duration::from_secs(20),
    );
    assert!(evs.iter().any(|e| matches!(e, Event::EngineAttached)));
    assert!(
        matches!(evs.last(), Some(Event::TxDone { cookie, status: TxStatus::Ok, .. }) if *cookie == c),
        "{evs:?}"
    );
    // peers[0] had sends in flight when the engine died: its credits are back.
    let mut more = HashSet::new();
    for i in 0..64u64 {
        let h = put(peers[0], nid("10.0.0.1@lu2k"), 100 + i, 1000);
        more.insert(k.send(&h, &[5u8; 1000]).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !more.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} sends never completed",
            more.len()
        );
        if let Some(Event::TxDone { cookie, status, .. }) = k.wait(Some(Duration::from_millis(100)))
        {
            assert_eq!(status, TxStatus::Ok);
            assert!(
                more.remove(&cookie),
                "{cookie:?} completed twice or unknown"
            );
        }
    }
    let st = k.stats();
    assert_eq!((st.attaches, st.engines_gone, k.session()), (2, 1, 1));
    let (free, chunk) = k.tx_pool_free();
    assert_eq!(
        u64::from(free) * u64::from(chunk),
        16 << 20,
        "TX pool whole"
    );
    drop(engine.join().unwrap());
}

/// After an engine goes: a message it delivered and the upper layer still holds
/// stays readable (the old region stays mapped), giving it back gives nothing to
/// the next engine; a TX buffer allocated before is refused; the next engine gets
/// a fresh region and its own messages come back to it.
#[test]
fn next_engine_gets_a_fresh_region_and_nothing_of_the_old() {
    let cfg = base_config("fresh");
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let me = nid("10.0.0.1@lu2k");
    let from = nid("10.0.0.9@lu2k");
    // An engine that delivers one message (token `token`) and, on `go`, exits.
    let spawn_engine = |token: u64, seed: u64| {
        let path = path.clone();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = thread::spawn(move || {
            let mut e = Engine::attach(&path);
            let mut data = vec![0u8; 3000];
            selftest::fill(seed, 0, &mut data);
            e.region.write_pool(Pool::Rx, 0, &data).unwrap();
            let d = RxDesc::inline(
                token,
                from,
                put(me, from, seed, 3000).to_bytes(),
                &[Extent::new(Pool::Rx, 0, 3000)],
            );
            assert!(e.cores[0].rx.push(d).unwrap());
            e.cores[0].to_kshim.notify().unwrap();
            go_rx.recv().unwrap();
            let mut back = Vec::new();
            while let Some(r) = e.cores[0].rx_return.pop().unwrap() {
                back.push(r.token);
            }
            (e.region.fd().try_clone_to_owned().unwrap(), back)
        });
        (t, go_tx)
    };
    let rx_of = |evs: Vec<Event>| {
        evs.into_iter()
            .find_map(|e| match e {
                Event::Rx(m) => Some(m),
                _ => None,
            })
            .unwrap()
    };
    let (e1, go1) = spawn_engine(11, 500);
    let old = rx_of(drain_until(
        &mut k,
        |e| matches!(e, Event::Rx(_)),
        Duration::from_secs(10),
    ));
    let stale = k.alloc_tx(5000).unwrap();
    go1.send(()).unwrap();
    let (fd1, back1) = e1.join().unwrap();
    assert!(back1.is_empty());
    let evs = drain_until(
        &mut k,
        |e| matches!(e, Event::EngineGone(_)),
        Duration::from_secs(10),
    );
    assert!(matches!(
        evs.last(),
        Some(Event::EngineGone(GoneReason::SocketClosed))
    ));
    // The held message still reads the gone engine's bytes.
    let mut data = vec![0u8; 3000];
    assert_eq!(old.copy_to(&mut data), 3000);
    assert_eq!(selftest::check(500, 0, &data), None);
    assert_eq!(
        k.send_buf(&put(from, me, 1, 5000), stale),
        Err(SendError::StaleBuffer)
    );
    let (e2, go2) = spawn_engine(22, 600);
    let new = rx_of(drain_until(
        &mut k,
        |e| matches!(e, Event::Rx(_)),
        Duration::from_secs(10),
    ));
    assert_eq!(new.copy_to(&mut data), 3000);
    assert_eq!(selftest::check(600, 0, &data), None);
    k.rx_done(old);
    k.rx_done(new);
    // Let kshim push the return, then let engine 2 collect.
    let _ = k.wait(Some(Duration::from_millis(50)));
    go2.send(()).unwrap();
    let (fd2, back2) = e2.join().unwrap();
    assert_eq!(
        back2,
        [22],
        "only the new engine's own message comes back to it"
    );
    let ino = |fd: &std::os::fd::OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
    assert_ne!(ino(&fd1), ino(&fd2), "the second engine got a fresh region");
    assert_eq!(
        k.stats().rx_returned,
        1,
        "a message of the ended session is dropped, not given back"
    );
}

/// Run as a child process by `engine_death_fails_inflight_sends`.
#[test]
#[ignore = "helper process for engine_death_fails_inflight_sends, which runs it"]
fn engine_child() {
    let Some(path) = std::env::var_os("LU2K_KSHIM_TEST_ENGINE") else {
        return;
    };
    let mut e = Engine::attach(Path::new(&path));
    let mut done = 0;
    loop {
        for (core, d) in e.take_tx(Duration::from_millis(100)) {
            if done < 10 {
                e.complete(core, d.cookie, TxStatus::Ok);
                done += 1;
            }
        }
    }
}

/// An engine that connects and never ACKs: the session ends after the attach timeout
/// and the sends fail back; without any engine, waits return and nothing hangs.
#[test]
fn silent_engine_times_out_and_no_engine_never_hangs() {
    let mut cfg = base_config("silent");
    cfg.attach_timeout = Duration::from_millis(300);
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let h = put(nid("10.0.0.2@lu2k"), nid("10.0.0.1@lu2k"), 0, 3);
    let c = k.send(&h, &[1, 2, 3]).unwrap();
    // No engine yet: a bounded wait returns with nothing.
    assert!(k.wait(Some(Duration::from_millis(100))).is_none());
    assert_eq!(k.pending(), 1);
    // The engine connects (in its own thread: HELLO comes when kshim polls) and stays
    // silent.
    let engine = thread::spawn(move || connect(&path));
    let evs = drain_until(
        &mut k,
        |e| matches!(e, Event::EngineGone(_)),
        Duration::from_secs(5),
    );
    let att = engine.join().unwrap();
    assert_eq!(att.hello.cores, 1);
    assert_eq!(att.hello.nids, [nid("10.0.0.1@lu2k")]);
    assert!(
        matches!(
            evs.as_slice(),
            [Event::TxDone { cookie, status: TxStatus::EngineGone, .. }, Event::EngineGone(GoneReason::AckTimeout)]
                if *cookie == c
        ),
        "{evs:?}"
    );
    drop(att);
}

/// The socket is not found after kshim is dropped, and a refused region ends the session.
#[test]
fn refused_region_ends_session() {
    let cfg = base_config("refused");
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let p2 = path.clone();
    let engine = thread::spawn(move || {
        let att = connect(&p2);
        att.ack(7).unwrap();
        att
    });
    let evs = drain_until(
        &mut k,
        |e| matches!(e, Event::EngineGone(_)),
        Duration::from_secs(5),
    );
    assert!(matches!(
        evs.last(),
        Some(Event::EngineGone(GoneReason::Refused(7)))
    ));
    drop(engine.join().unwrap());
    drop(k);
    assert!(!path.exists());
}

/// `wait` with a long timeout returns as soon as the engine rings the doorbell (the
/// engine only rings because kshim armed its need-wakeup word), and as soon as the
/// engine's socket closes: nothing waits out the timeout.
#[test]
fn wait_wakes_on_doorbell_and_on_engine_exit() {
    let mut cfg = base_config("wake");
    cfg.cores = 3;
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let engine = thread::spawn(move || {
        let mut e = Engine::attach(&path);
        let got = e.take_tx(Duration::from_secs(10));
        assert_eq!(got.len(), 1);
        let (core, d) = got[0];
        rx.recv().unwrap();
        // Let kshim fall asleep in wait() first.
        thread::sleep(Duration::from_millis(300));
        e.complete(core, d.cookie, TxStatus::Ok);
        rx.recv().unwrap();
        thread::sleep(Duration::from_millis(300));
        drop(e); // socket closes
    });
    let peer = nid("10.0.0.5@lu2k");
    let c = k
        .send(&put(peer, nid("10.0.0.1@lu2k"), 1, 10), &[0; 10])
        .unwrap();
    let evs = drain_until(
        &mut k,
        |e| matches!(e, Event::EngineAttached),
        Duration::from_secs(10),
    );
    assert!(matches!(evs.last(), Some(Event::EngineAttached)));
    tx.send(()).unwrap();
    let long = Duration::from_secs(30);
    let t = Instant::now();
    let ev = k.wait(Some(long));
    assert!(
        matches!(ev, Some(Event::TxDone { cookie, status: TxStatus::Ok, .. }) if cookie == c),
        "{ev:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "doorbell did not wake kshim"
    );
    tx.send(()).unwrap();
    let t = Instant::now();
    let ev = loop {
        match k.wait(Some(long)) {
            Some(Event::PeerUp(_)) => continue,
            ev => break ev,
        }
    };
    assert!(
        matches!(ev, Some(Event::EngineGone(GoneReason::SocketClosed))),
        "{ev:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "socket close did not wake kshim"
    );
    engine.join().unwrap();
}

/// With a small TX pool and an engine that holds completions back, kshim never hands
/// out pool bytes (payload chunks or extent tables) that an uncompleted descriptor
/// still references; sends beyond the pool wait (SendError::Pool) and proceed as
/// completions return buffers; every buffer is home at the end.
#[test]
fn tx_buffers_reused_only_after_completion() {
    let mut cfg = base_config("reuse");
    cfg.tx_chunk_size = 4096;
    cfg.tx_pool_len = 24 * 4096;
    cfg.credits = 16;
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let total_chunks = k.tx_pool_free().0;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let engine = thread::spawn(move || {
        let mut e = Engine::attach(&path);
        // Outstanding descriptors: (core, cookie, byte ranges in the TX pool).
        type Held = (u32, u64, Vec<(u64, u64)>);
        let mut held: std::collections::VecDeque<Held> = Default::default();
        let mut checked = 0u64;
        // Until all 400 were seen (some wait in kshim for credits) and completed.
        while checked < 400 || !held.is_empty() {
            let batch = e.take_tx(Duration::from_millis(1));
            let idle = batch.is_empty();
            for (core, d) in batch {
                let mut scratch = ExtentBuf::new();
                let v = e.region.validate_tx(&d, &mut scratch).unwrap();
                let mut ranges: Vec<(u64, u64)> = v
                    .extents
                    .iter()
                    .map(|x| (x.offset, x.offset + u64::from(x.len)))
                    .collect();
                if d.flags & ring_abi::TxFlags::INDIRECT.bits() != 0 {
                    ranges.push((d.ext[0].offset, d.ext[0].offset + u64::from(d.ext[0].len)));
                }
                for (_, _, other) in &held {
                    for &(a0, a1) in &ranges {
                        for &(b0, b1) in other {
                            assert!(a1 <= b0 || b1 <= a0, "pool bytes reused before completion");
                        }
                    }
                }
                checked += 1;
                held.push_back((core, d.cookie, ranges));
            }
            // Complete only the oldest: while many are held, or all but the newest two in
            // an idle round (kshim is then waiting for pool space).
            while idle && held.len() > 2 {
                let (core, cookie, _) = held.pop_front().unwrap();
                e.complete(core, cookie, TxStatus::Ok);
            }
            while held.len() > 10 || (stop2.load(Ordering::Relaxed) && !held.is_empty()) {
                let (core, cookie, _) = held.pop_front().unwrap();
                e.complete(core, cookie, TxStatus::Ok);
            }
        }
        (checked, e)
    });
    let mut pending = HashSet::new();
    let mut pool_waits = 0;
    let mut x = 12345u64;
    for i in 0..400u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let size = (x >> 40) as usize % 20000;
        let h = put(nid("10.0.0.2@lu2k"), nid("10.0.0.1@lu2k"), i, size);
        let data = vec![(i % 251) as u8; size];
        loop {
            match k.send(&h, &data) {
                Ok(c) => {
                    pending.insert(c);
                    break;
                }
                Err(SendError::Pool(_)) => {
                    pool_waits += 1;
                    if let Some(Event::TxDone { cookie, .. }) =
                        k.wait(Some(Duration::from_millis(20)))
                    {
                        assert!(pending.remove(&cookie));
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        while let Some(ev) = k.poll() {
            if let Event::TxDone { cookie, .. } = ev {
                assert!(pending.remove(&cookie));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} sends never completed",
            pending.len()
        );
        if let Some(Event::TxDone { cookie, status, .. }) = k.wait(Some(Duration::from_millis(20)))
        {
            assert_eq!(status, TxStatus::Ok);
            assert!(pending.remove(&cookie));
        }
    }
    let (checked, _e) = engine.join().unwrap();
    assert_eq!(checked, 400);
    assert!(
        pool_waits > 0,
        "the test must exhaust the pool to mean anything"
    );
    assert_eq!(k.tx_pool_free().0, total_chunks);
}

/// IPv6 NIDs end to end through the region: kshim on `fd00::1@lu2k` sends with
/// `send_to` to IPv6 peers; each descriptor carries the peer's 24-byte NID, passes the
/// engine's validation, sits on the core the shard function names for it, and its
/// completion comes back once.
#[test]
fn ipv6_peers_get_their_nid_and_core() {
    let mut cfg = base_config("ipv6");
    cfg.nids = vec![nid("fd00::1@lu2k")];
    cfg.cores = 3;
    let path = cfg.socket_path.clone();
    let mut k = Kshim::start(cfg).unwrap();
    let peers: Vec<Nid> = (2..8)
        .map(|i| nid(&format!("fd00:17::{i:x}@lu2k")))
        .collect();
    const EACH: usize = 5;
    let total = peers.len() * EACH;
    let engine = thread::spawn(move || {
        let mut e = Engine::attach(&path);
        let mut got: Vec<(u32, Nid)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < total {
            assert!(
                Instant::now() < deadline,
                "only {} of {total} sends",
                got.len()
            );
            for (core, d) in e.take_tx(Duration::from_millis(100)) {
                let mut scratch = ExtentBuf::new();
                let v = e
                    .region
                    .validate_tx(&d, &mut scratch)
                    .expect("valid descriptor");
                assert_eq!(v.total_len, 100);
                got.push((core, v.peer_nid));
                e.complete(core, d.cookie, TxStatus::Ok);
            }
        }
        (got, e)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !k.is_attached() {
        assert!(Instant::now() < deadline, "engine never attached");
        let _ = k.wait(Some(Duration::from_millis(20)));
    }
    let me = nid("fd00::1@lu2k");
    let mut pending = HashSet::new();
    for (i, p) in peers.iter().enumerate() {
        for j in 0..EACH {
            let c = k
                .send_to(*p, &put(*p, me, (i * EACH + j) as u64, 100), &[7u8; 100])
                .unwrap();
            pending.insert(c);
        }
    }
    drain_until(
        &mut k,
        |e| {
            if let Event::TxDone { cookie, status, .. } = e {
                assert_eq!(*status, TxStatus::Ok);
                assert!(pending.remove(cookie), "completion of {cookie:?} twice");
            }
            pending.is_empty()
        },
        Duration::from_secs(20),
    );
    let (got, _e) = engine.join().unwrap();
    let mut cores_used = HashSet::new();
    for (core, n) in &got {
        assert!(peers.contains(n), "descriptor for {n}");
        assert!(!n.is_nid4());
        assert_eq!(*core, ring_abi::shard(*n, 3), "{n} on core {core}");
        cores_used.insert(*core);
    }
    for p in &peers {
        assert_eq!(got.iter().filter(|(_, n)| n == p).count(), EACH, "{p}");
    }
    assert!(cores_used.len() > 1, "six IPv6 peers all on one core");
}
