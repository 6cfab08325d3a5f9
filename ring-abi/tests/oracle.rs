//! Ring cursor logic against a simple oracle (a `VecDeque` with a capacity), with random
//! sequences of reserve/write/commit, peek/read/release, push/pop and slice operations in
//! random batch sizes, on rings of random power-of-two sizes whose indices start near
//! `u32::MAX` so they wrap during the run. The rings are the real ones, in a real memfd
//! region, with both ends attached in this process.
#![cfg(not(loom))]

use std::collections::VecDeque;

use lu2k_ring_abi::{Config, Eventfds, Region, TxDesc};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Reserve up to n, write all granted, commit a fraction (per-mille) of them.
    ReserveCommit(u32, u32),
    /// Peek up to n, read all, release a fraction of them.
    PeekRelease(u32, u32),
    Push,
    Pop,
    PushSlice(usize),
    PopSlice(usize),
    IsEmpty,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..40, 0u32..=1000).prop_map(|(n, f)| Op::ReserveCommit(n, f)),
        (0u32..40, 0u32..=1000).prop_map(|(n, f)| Op::PeekRelease(n, f)),
        Just(Op::Push),
        Just(Op::Pop),
        (0usize..40).prop_map(Op::PushSlice),
        (0usize..40).prop_map(Op::PopSlice),
        Just(Op::IsEmpty),
    ]
}

fn desc(seq: u64) -> TxDesc {
    let mut d = TxDesc::inline(
        seq,
        lu2k_ring_abi::Nid::from_nid4(!seq),
        [(seq % 251) as u8; 72],
        &[],
    );
    d.total_len = seq as u32;
    d
}

fn run(entries_log2: u32, start: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let entries = 1u32 << entries_log2;
    let cfg = Config {
        tx_entries: entries,
        tx_done_entries: 1,
        rx_entries: 1,
        rx_return_entries: 1,
        tx_pool_len: 4096,
        rx_buf_size: 64,
        rx_buf_count: 1,
        rx_tables_per_core: 0,
        start_index: start,
        ..Config::default()
    };
    let region = Region::create(&cfg).unwrap();
    let mut k = region.kshim_core(0, Eventfds::none()).unwrap();
    let mut e = region.engine_core(0, Eventfds::none()).unwrap();
    let (p, c) = (&mut k.tx, &mut e.tx);
    prop_assert_eq!(p.entries(), entries);

    let mut oracle: VecDeque<u64> = VecDeque::new();
    let mut next_seq = 0u64;
    let mut produced = 0u32;
    let mut consumed = 0u32;
    let cap = entries as usize;

    for op in ops {
        match op {
            Op::ReserveCommit(n, frac) => {
                let got = p.reserve(n).unwrap();
                prop_assert_eq!(got as usize, (n as usize).min(cap - oracle.len()));
                for i in 0..got {
                    p.write(i, desc(next_seq + u64::from(i)));
                }
                let k = got * frac / 1000;
                p.commit(k);
                for _ in 0..k {
                    oracle.push_back(next_seq);
                    next_seq += 1;
                }
                produced = produced.wrapping_add(k);
            }
            Op::PeekRelease(n, frac) => {
                let got = c.peek(n).unwrap();
                // Never more than published or asked; something whenever both are non-zero
                // (the consumer may see less than published when its cache is not empty).
                prop_assert!(got as usize <= (n as usize).min(oracle.len()));
                if n > 0 && !oracle.is_empty() {
                    prop_assert!(got > 0);
                }
                for i in 0..got {
                    prop_assert_eq!(c.read(i), desc(oracle[i as usize]));
                }
                let k = got * frac / 1000;
                c.release(k);
                for _ in 0..k {
                    oracle.pop_front();
                }
                consumed = consumed.wrapping_add(k);
            }
            Op::Push => {
                let ok = p.push(desc(next_seq)).unwrap();
                prop_assert_eq!(ok, oracle.len() < cap);
                if ok {
                    oracle.push_back(next_seq);
                    next_seq += 1;
                    produced = produced.wrapping_add(1);
                }
            }
            Op::Pop => {
                let got = c.pop().unwrap();
                let want = oracle.pop_front();
                prop_assert_eq!(got, want.map(desc));
                if want.is_some() {
                    consumed = consumed.wrapping_add(1);
                }
            }
            Op::PushSlice(n) => {
                let vals: Vec<TxDesc> = (0..n as u64).map(|i| desc(next_seq + i)).collect();
                let got = p.push_slice(&vals).unwrap();
                prop_assert_eq!(got, n.min(cap - oracle.len()));
                for _ in 0..got {
                    oracle.push_back(next_seq);
                    next_seq += 1;
                }
                produced = produced.wrapping_add(got as u32);
            }
            Op::PopSlice(n) => {
                let mut out = vec![desc(u64::MAX); n];
                let got = c.pop_slice(&mut out).unwrap();
                prop_assert!(got <= n.min(oracle.len()));
                if n > 0 && !oracle.is_empty() {
                    prop_assert!(got > 0);
                }
                for d in &out[..got] {
                    prop_assert_eq!(*d, desc(oracle.pop_front().unwrap()));
                }
                consumed = consumed.wrapping_add(got as u32);
            }
            Op::IsEmpty => {
                prop_assert_eq!(c.is_empty().unwrap(), oracle.is_empty());
            }
        }
        prop_assert_eq!(p.index(), start.wrapping_add(produced));
        prop_assert_eq!(c.index(), start.wrapping_add(consumed));
    }
    // Drain: everything published comes out exactly once, in order.
    while let Some(d) = c.pop().unwrap() {
        prop_assert_eq!(d, desc(oracle.pop_front().unwrap()));
    }
    prop_assert!(oracle.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cursors_match_the_oracle_across_u32_wraparound(
        entries_log2 in 0u32..=5,
        start in prop_oneof![u32::MAX - 64..=u32::MAX, any::<u32>()],
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        run(entries_log2, start, ops)?;
    }
}

#[test]
fn indices_wrap_past_u32_max_with_full_rings() {
    // Deterministic companion: fill and drain a 4-entry ring 100 times from u32::MAX - 5.
    let ops = (0..100)
        .flat_map(|_| [Op::ReserveCommit(4, 1000), Op::PeekRelease(4, 1000)])
        .collect();
    run(2, u32::MAX - 5, ops).unwrap();
}
