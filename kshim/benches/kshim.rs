//! kshim's producer path against a spinning engine thread on the real region:
//! `send` (payload copied into the TX pool) → TX ring → engine validates and completes
//! → TX completion ring → `Event::TxDone`, with a window of messages in flight.
//! Throughput is in messages (elements) and, for payload sizes, bytes.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lu2k_kshim::attach;
use lu2k_kshim::hdr::{Msg, Repr, WireHandle};
use lu2k_kshim::ring_abi::{Eventfds, ExtentBuf, Region, TxCompletion, TxStatus};
use lu2k_kshim::{Config, Event, Kshim, Nid};

fn engine(path: PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let t0 = Instant::now();
        let mut att = loop {
            match attach::connect(&path) {
                Ok(a) => break a,
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let region = Region::from_fd(att.memfd.try_clone().unwrap()).unwrap();
        let fds = Eventfds {
            to_engine: Some(att.to_engine.remove(0)),
            to_kshim: Some(att.to_kshim.remove(0)),
        };
        let mut core = region.engine_core(0, fds).unwrap();
        att.ack(0).unwrap();
        let mut scratch = ExtentBuf::new();
        let mut buf = Vec::with_capacity(64);
        while !stop.load(Ordering::Relaxed) {
            buf.clear();
            while let Some(d) = core.tx.pop().unwrap() {
                let v = region.validate_tx(&d, &mut scratch).unwrap();
                buf.push(TxCompletion::new(v.cookie, TxStatus::Ok, 0));
            }
            if buf.is_empty() {
                std::hint::spin_loop();
                continue;
            }
            let mut at = 0;
            while at < buf.len() {
                at += core.tx_done.push_slice(&buf[at..]).unwrap();
            }
            core.to_kshim.notify().unwrap();
        }
    })
}

fn bench(c: &mut Criterion) {
    let me: Nid = "10.0.0.1@lu2k".parse().unwrap();
    let peer: Nid = "10.0.0.2@lu2k".parse().unwrap();
    let path = std::env::temp_dir().join(format!("lu2k-kshim-bench-{}.sock", std::process::id()));
    let mut cfg = Config::new(vec![me], &path);
    cfg.tx_pool_len = 64 << 20;
    cfg.rx_buf_count = 16;
    let mut k = Kshim::start(cfg).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let eng = engine(path, stop.clone());
    while !matches!(
        k.wait(Some(Duration::from_secs(10))),
        Some(Event::EngineAttached)
    ) {}

    let mut g = c.benchmark_group("kshim_send_complete");
    for size in [0usize, 4096, 1 << 20] {
        let payload = vec![0x5au8; size];
        let hdr = Repr {
            dest_nid: peer.nid4().unwrap(),
            src_nid: me.nid4().unwrap(),
            dest_pid: 12345,
            src_pid: 12345,
            payload_length: size as u32,
            msg: Msg::Put {
                ack_wmd: WireHandle::default(),
                match_bits: 0,
                hdr_data: 0,
                ptl_index: 4,
                offset: 0,
            },
        };
        let window: u64 = if size >= 1 << 20 { 32 } else { 256 };
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{size}B_window{window}"), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                let (mut sent, mut done) = (0u64, 0u64);
                while done < iters {
                    while sent < iters && sent - done < window {
                        match k.send(&hdr, &payload) {
                            Ok(ck) => {
                                black_box(ck);
                                sent += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    while let Some(ev) = k.poll() {
                        if let Event::TxDone { status, .. } = ev {
                            assert_eq!(status, TxStatus::Ok);
                            done += 1;
                        }
                    }
                }
                t.elapsed()
            })
        });
    }
    g.finish();
    stop.store(true, Ordering::Relaxed);
    eng.join().unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
