//! Kernel feature probing: what io_uring and the UDP stack offer here, and which I/O
//! path the engine will therefore run.
//!
//! Opcodes are read from `IORING_REGISTER_PROBE`; set-up flags and registrations are
//! tried for real on a throw-away ring; socket options on a throw-away socket. The
//! fast path is then *exercised* once on loopback (a GSO zero-copy send from a
//! registered buffer, received by a multishot recvmsg into a provided-buffer ring), so
//! a kernel that advertises an operation but rejects the engine's use of it still ends
//! on the slow path, with the reason printed.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use io_uring::{opcode, IoUring, Probe};

use crate::io::sys::{self, Mapping, OwnedMem, SockOpts};
use crate::io::uring::{UringIo, UringOpts};
use crate::io::{DatagramIo, Event, Segment};

/// Which I/O path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum IoPath {
    /// io_uring: SENDMSG_ZC, multishot recvmsg, provided buffers.
    Uring,
    /// epoll + sendmmsg/recvmmsg.
    Epoll,
}

impl fmt::Display for IoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoPath::Uring => "io_uring (fast)",
            IoPath::Epoll => "epoll + sendmmsg/recvmmsg (slow)",
        })
    }
}

/// What the kernel offers.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Features {
    /// Kernel release (uname -r).
    pub kernel: String,
    /// io_uring_setup works at all.
    pub io_uring: bool,
    /// Why io_uring is unavailable, if it is.
    pub io_uring_error: Option<String>,
    /// IORING_SETUP_SINGLE_ISSUER.
    pub single_issuer: bool,
    /// IORING_SETUP_DEFER_TASKRUN.
    pub defer_taskrun: bool,
    /// IORING_OP_SENDMSG_ZC.
    pub sendmsg_zc: bool,
    /// IORING_OP_SEND_ZC.
    pub send_zc: bool,
    /// IORING_SEND_ZC_REPORT_USAGE (6.2+): zero-copy sends report whether the kernel
    /// copied after all (`ZC_COPIED`). Without it the fast path still sends zero-copy,
    /// but kernel copies are not counted and the `auto` zero-copy policy cannot detect
    /// them (it stays on SENDMSG_ZC).
    pub zc_report_usage: bool,
    /// IORING_OP_RECVMSG (multishot needs 6.0+, checked by the self-test).
    pub recvmsg: bool,
    /// IORING_OP_POLL_ADD (doorbell eventfd waits).
    pub poll_add: bool,
    /// IORING_OP_TIMEOUT.
    pub timeout: bool,
    /// IORING_OP_FUTEX_WAIT / FUTEX_WAKE.
    pub futex: bool,
    /// IORING_OP_MSG_RING.
    pub msg_ring: bool,
    /// IORING_REGISTER_PBUF_RING.
    pub pbuf_ring: bool,
    /// `IOU_PBUF_RING_INC` (6.12+): buffers consumed incrementally.
    #[serde(default)]
    pub pbuf_inc: bool,
    /// `min_left` of an incremental ring (Linux 7.1): the kernel moves to the next
    /// buffer when less than that is left, instead of truncating a datagram or
    /// failing a multishot `recvmsg` with `EFAULT` at a buffer's end.
    #[serde(default)]
    pub pbuf_inc_min_left: bool,
    /// `IORING_FEAT_MIN_TIMEOUT` (6.12+): the minimum wait with which a sleeping
    /// core lets completions gather (`gather_us`).
    pub min_wait: bool,
    /// IORING_REGISTER_BUFFERS.
    pub registered_buffers: bool,
    /// UDP_SEGMENT (GSO).
    pub udp_gso: bool,
    /// UDP_GRO.
    pub udp_gro: bool,
    /// Fast-path self-test result: multishot recvmsg delivered the GSO send, with the
    /// send's zero-copy notification.
    pub selftest: Option<SelfTest>,
    /// Why the self-test failed or did not run.
    pub selftest_error: Option<String>,
}

/// What the fast-path self-test saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SelfTest {
    /// SENDMSG_ZC used the registered buffer (buf_index; Linux 6.15+).
    pub fixed_tx: bool,
    /// The kernel reported ZC_COPIED (expected on loopback).
    pub zc_copied: bool,
    /// Received datagrams came coalesced (GRO).
    pub gro_coalesced: bool,
}

impl Features {
    /// Probes this kernel (takes a few milliseconds).
    pub fn probe() -> Features {
        let mut f = Features {
            kernel: sys::kernel_release(),
            selftest_error: Some("not run".into()),
            ..Default::default()
        };
        (f.udp_gso, f.udp_gro) = sys::probe_udp_offloads();
        let ring = match IoUring::new(8) {
            Ok(r) => r,
            Err(e) => {
                f.io_uring_error = Some(e.to_string());
                f.selftest_error = Some(format!("io_uring unavailable: {e}"));
                return f;
            }
        };
        f.io_uring = true;
        f.single_issuer = IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
            .setup_single_issuer()
            .build(8)
            .is_ok();
        f.defer_taskrun = IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(8)
            .is_ok();
        let mut probe = Probe::new();
        if ring.submitter().register_probe(&mut probe).is_ok() {
            f.sendmsg_zc = probe.is_supported(opcode::SendMsgZc::CODE);
            f.send_zc = probe.is_supported(opcode::SendZc::CODE);
            f.recvmsg = probe.is_supported(opcode::RecvMsg::CODE);
            f.poll_add = probe.is_supported(opcode::PollAdd::CODE);
            f.timeout = probe.is_supported(opcode::Timeout::CODE);
            f.futex = probe.is_supported(opcode::FutexWait::CODE)
                && probe.is_supported(opcode::FutexWake::CODE);
            f.msg_ring = probe.is_supported(opcode::MsgRingData::CODE);
        }
        f.zc_report_usage = f.send_zc && crate::io::uring::zc_report_usage_supported();
        f.min_wait = ring.params().is_feature_min_timeout();
        if let Ok(m) = Mapping::anon(4096) {
            let iov = libc::iovec {
                iov_base: m.as_ptr().cast(),
                iov_len: m.len(),
            };
            f.registered_buffers = crate::io::uring::try_register(&ring, &iov);
            f.pbuf_ring = crate::io::uring::try_register_pbuf(&ring, &m);
            (f.pbuf_inc, f.pbuf_inc_min_left) = crate::io::uring::try_register_pbuf_inc(&ring, &m);
        }
        let r = if f.sendmsg_zc && f.recvmsg && f.pbuf_ring && f.timeout && f.poll_add {
            selftest()
        } else {
            Err("a required io_uring operation is missing".into())
        };
        match r {
            Ok(t) => {
                f.selftest = Some(t);
                f.selftest_error = None;
            }
            Err(e) => f.selftest_error = Some(e),
        }
        f
    }

    /// The path the engine runs with these features, and why.
    pub fn choose(&self, force_slow: bool) -> (IoPath, String) {
        if force_slow {
            return (
                IoPath::Epoll,
                "forced (--io-path epoll or LU2K_FORCE_SLOW=1)".into(),
            );
        }
        if !self.io_uring {
            return (
                IoPath::Epoll,
                format!(
                    "io_uring unavailable: {}",
                    self.io_uring_error.as_deref().unwrap_or("?")
                ),
            );
        }
        match (&self.selftest, &self.selftest_error) {
            (Some(_), _) => (IoPath::Uring, "all fast-path operations work".into()),
            (None, e) => (
                IoPath::Epoll,
                format!(
                    "fast-path self-test failed: {}",
                    e.as_deref().unwrap_or("?")
                ),
            ),
        }
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "NO" };
        writeln!(f, "kernel                         {}", self.kernel)?;
        writeln!(
            f,
            "io_uring                       {}{}",
            yn(self.io_uring),
            self.io_uring_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  SETUP_SINGLE_ISSUER          {}",
            yn(self.single_issuer)
        )?;
        writeln!(
            f,
            "  SETUP_DEFER_TASKRUN          {}",
            yn(self.defer_taskrun)
        )?;
        writeln!(f, "  OP_SENDMSG_ZC                {}", yn(self.sendmsg_zc))?;
        writeln!(f, "  OP_SEND_ZC                   {}", yn(self.send_zc))?;
        writeln!(
            f,
            "  SEND_ZC_REPORT_USAGE         {}",
            if self.zc_report_usage {
                "yes"
            } else {
                "NO (kernel < 6.2: zero-copy sends run without usage reports; ZC_COPIED counting unavailable, zc auto stays on SENDMSG_ZC)"
            }
        )?;
        writeln!(f, "  OP_RECVMSG                   {}", yn(self.recvmsg))?;
        writeln!(f, "  OP_POLL_ADD (doorbell)       {}", yn(self.poll_add))?;
        writeln!(f, "  OP_TIMEOUT                   {}", yn(self.timeout))?;
        writeln!(f, "  OP_FUTEX_WAIT/WAKE           {}", yn(self.futex))?;
        writeln!(f, "  OP_MSG_RING                  {}", yn(self.msg_ring))?;
        writeln!(f, "  REGISTER_PBUF_RING           {}", yn(self.pbuf_ring))?;
        writeln!(
            f,
            "  PBUF_RING_INC                {} (min_left: {}); RX memory: buffers cut into datagram-sized receives where no GRO coalesces, incremental consumption not used",
            yn(self.pbuf_inc),
            yn(self.pbuf_inc_min_left)
        )?;
        writeln!(
            f,
            "  FEAT_MIN_TIMEOUT             {}",
            if self.min_wait {
                "yes (a sleeping core far from its peers lets completions gather, gather_us)"
            } else {
                "no (kernel < 6.12: cores wake for each completion)"
            }
        )?;
        writeln!(
            f,
            "  REGISTER_BUFFERS             {}",
            yn(self.registered_buffers)
        )?;
        writeln!(f, "UDP_SEGMENT (GSO)              {}", yn(self.udp_gso))?;
        writeln!(f, "UDP_GRO                        {}", yn(self.udp_gro))?;
        match &self.selftest {
            Some(t) => writeln!(
                f,
                "fast-path self-test            ok (multishot recvmsg + SENDMSG_ZC; fixed TX buffer: {}, ZC_COPIED reported: {}, GRO coalesced: {})",
                yn(t.fixed_tx),
                if self.zc_report_usage {
                    yn(t.zc_copied)
                } else {
                    "n/a (no usage reports)"
                },
                yn(t.gro_coalesced)
            ),
            None => writeln!(
                f,
                "fast-path self-test            FAILED: {}",
                self.selftest_error.as_deref().unwrap_or("?")
            ),
        }
    }
}

/// Runs the fast path once over loopback: 4 datagrams as one GSO `SENDMSG_ZC` from a
/// registered buffer, received by multishot recvmsg into a provided-buffer ring.
pub fn selftest() -> Result<SelfTest, String> {
    let opts = SockOpts {
        reuseport: false,
        sndbuf: 1 << 20,
        rcvbuf: 1 << 20,
        gro: true,
    };
    let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
    let (a, _) = sys::udp_socket(lo, &opts).map_err(|e| format!("socket: {e}"))?;
    let (b, binfo) = sys::udp_socket(lo, &opts).map_err(|e| format!("socket: {e}"))?;
    let uopts = UringOpts {
        entries: 64,
        send_slots: 4,
        // Whole buffers: the loopback GSO send arrives as one batch.
        rx_slice: 0,
        ..UringOpts::default()
    };
    let mem = OwnedMem::new(4, 65536, 8, 65536 + 4096).map_err(|e| e.to_string())?;
    let mut tx_io = UringIo::new_owned(a, mem, None, uopts).map_err(|e| format!("ring: {e}"))?;
    let mem = OwnedMem::new(4, 4096, 8, 65536 + 4096).map_err(|e| e.to_string())?;
    let mut rx_io = UringIo::new_owned(b, mem, None, uopts).map_err(|e| format!("ring: {e}"))?;
    let hdr = [0xabu8; 16];
    let segs: Vec<Segment<'_>> = (0..4)
        .map(|i| Segment {
            hdr: &hdr,
            payload_off: i * 1000,
            payload_len: 1000,
            more: &[],
        })
        .collect();
    tx_io
        .send(binfo.local, &segs, 7)
        .map_err(|e| format!("send: {e}"))?;
    let mut t = SelfTest {
        fixed_tx: tx_io.setup().fixed_tx,
        ..Default::default()
    };
    let mut got = 0u32;
    let mut done = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut ev = Vec::new();
    while (!done || got < 4 * 1016) && Instant::now() < deadline {
        ev.clear();
        tx_io
            .wait(None, false, &mut ev)
            .map_err(|e| e.to_string())?;
        rx_io
            .wait(
                Some(Instant::now() + Duration::from_millis(20)),
                true,
                &mut ev,
            )
            .map_err(|e| e.to_string())?;
        for e in &ev {
            match *e {
                Event::SendDone {
                    result,
                    kernel_copied,
                    ..
                } => {
                    result.map_err(|e| format!("SENDMSG_ZC failed: errno {e}"))?;
                    t.zc_copied = kernel_copied;
                    done = true;
                }
                Event::Recv { bid, len, seg, .. } => {
                    got += len;
                    t.gro_coalesced |= seg < len;
                    rx_io.return_rx(bid);
                }
                _ => {}
            }
        }
    }
    if !done {
        return Err("SENDMSG_ZC completion or notification never came".into());
    }
    if got != 4 * 1016 {
        return Err(format!(
            "multishot recvmsg delivered {got} of {} bytes",
            4 * 1016
        ));
    }
    Ok(t)
}
