//! How a send's [`TxStatus`] reads to LNet: the errno an LND passes to
//! `lnet_finalize()` and the health status it sets on the message
//! (`msg_health_status`), which decides whether LNet resends it.
//!
//! LNet's health code (`lnet_health_check()` in `lnet/lnet/lib-msg.c`, Lustre
//! 2.17) resends a message whose LND completion is one of the `LOCAL_INTERRUPT`,
//! `LOCAL_DROPPED`, `LOCAL_ABORTED`, `LOCAL_NO_ROUTE`, `LOCAL_TIMEOUT` statuses or
//! `REMOTE_DROPPED`, up to `lnet_retry_count` times and within
//! `lnet_transaction_timeout`; it never resends on `LOCAL_ERROR`, `REMOTE_ERROR`,
//! `REMOTE_TIMEOUT` or `NETWORK_TIMEOUT`. Two limits apply: local resends are made
//! only on a node with more than one interface and remote ones only toward a peer
//! with more than one (routers excepted), so a single-rail node relies on the layer
//! above (ptlrpc resends the RPC after its timeout and drops duplicates by XID).
//! `ksocklnd` maps a failed connection the same way: `-EHOSTUNREACH`,
//! `-ECONNRESET`, `-ECONNREFUSED`, `-ENETUNREACH`, `-ENETDOWN` to `REMOTE_DROPPED`,
//! `-ETIMEDOUT` to `NETWORK_TIMEOUT`, any other error to `LOCAL_ERROR`.
//!
//! | [`TxStatus`] | errno | health status | LNet resends |
//! |---|---|---|---|
//! | `Ok` | 0 | `OK` | — |
//! | `PeerUnreachable` | `-EHOSTUNREACH` | `REMOTE_DROPPED` | yes |
//! | `TimedOut` | `-ETIMEDOUT` | `NETWORK_TIMEOUT` | no |
//! | `Aborted` | `-ECONNABORTED` | `LOCAL_ABORTED` | yes |
//! | `InvalidDescriptor` | `-EINVAL` | `LOCAL_ERROR` | no |
//! | `NoResources` | `-ENOMEM` | `LOCAL_DROPPED` | yes |
//! | `EngineGone` | `-ENOTCONN` | `LOCAL_ABORTED` | yes |
//! | `PeerReset` | `-ECONNRESET` | `REMOTE_DROPPED` | yes |
//! | `Shutdown` | `-ESHUTDOWN` | `LOCAL_ABORTED` | yes |
//!
//! `EngineGone` and `Shutdown` are local aborts: lu2k's own transport went away
//! under the message, the network and the peer are not to blame (the peer's
//! health is left alone) and a new engine can carry the resend. The local NI does
//! pay: on a node with more than one interface, every `LOCAL_*` completion calls
//! `lnet_handle_local_failure()`, which lowers the lu2k NI's health by
//! `lnet_health_sensitivity` (default 100 of 1000) and queues it for recovery
//! pings, so an engine crash with 10 or more messages in flight takes the NI's
//! health to 0 and LNet prefers the node's other interfaces until the pings
//! restore it. On a single-interface node LNet skips local health (and local
//! resends) altogether. `TimedOut` stays
//! unresent as in `ksocklnd`: the peer may hold the message, and a resend is the
//! RPC layer's decision. An invalid descriptor is a bug, not a condition to retry.

use crate::ring_abi::TxStatus;

/// LNet's message health status (`enum lnet_msg_hstatus`), the values an LND sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    /// `LNET_MSG_STATUS_OK`.
    Ok,
    /// `LNET_MSG_STATUS_LOCAL_DROPPED`.
    LocalDropped,
    /// `LNET_MSG_STATUS_LOCAL_ABORTED`.
    LocalAborted,
    /// `LNET_MSG_STATUS_LOCAL_ERROR`.
    LocalError,
    /// `LNET_MSG_STATUS_REMOTE_DROPPED`.
    RemoteDropped,
    /// `LNET_MSG_STATUS_NETWORK_TIMEOUT`.
    NetworkTimeout,
}

impl Health {
    /// Whether LNet's health code would resend a message that ended so (given
    /// retries left and, see the module doc, more than one interface).
    pub fn resent_by_lnet(self) -> bool {
        matches!(
            self,
            Health::LocalDropped | Health::LocalAborted | Health::RemoteDropped
        )
    }
}

/// Linux errno values (positive) used in the mapping.
mod errno {
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const ENOTCONN: i32 = 107;
    pub const ECONNABORTED: i32 = 103;
    pub const ECONNRESET: i32 = 104;
    pub const ESHUTDOWN: i32 = 108;
    pub const ETIMEDOUT: i32 = 110;
    pub const EHOSTUNREACH: i32 = 113;
}

/// What an LND hands LNet for a completed send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The status for `lnet_finalize()`: 0 or a negative errno.
    pub errno: i32,
    /// The health status LNet's resend decision reads.
    pub health: Health,
}

/// The mapping of the module doc's table.
pub fn completion(status: TxStatus) -> Completion {
    let (e, health) = match status {
        TxStatus::Ok => (0, Health::Ok),
        TxStatus::PeerUnreachable => (errno::EHOSTUNREACH, Health::RemoteDropped),
        TxStatus::TimedOut => (errno::ETIMEDOUT, Health::NetworkTimeout),
        TxStatus::Aborted => (errno::ECONNABORTED, Health::LocalAborted),
        TxStatus::InvalidDescriptor => (errno::EINVAL, Health::LocalError),
        TxStatus::NoResources => (errno::ENOMEM, Health::LocalDropped),
        TxStatus::EngineGone => (errno::ENOTCONN, Health::LocalAborted),
        TxStatus::PeerReset => (errno::ECONNRESET, Health::RemoteDropped),
        TxStatus::Shutdown => (errno::ESHUTDOWN, Health::LocalAborted),
    };
    Completion { errno: -e, health }
}

/// Whether LNet would resend a message that completed with `status`.
pub fn retried(status: TxStatus) -> bool {
    completion(status).health.resent_by_lnet()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errno values are Linux's, and the statuses an engine crash or restart
    /// produces are ones LNet resends.
    #[test]
    fn mapping_matches_linux_and_lnet() {
        assert_eq!(errno::ENOTCONN, rustix::io::Errno::NOTCONN.raw_os_error());
        assert_eq!(
            errno::EHOSTUNREACH,
            rustix::io::Errno::HOSTUNREACH.raw_os_error()
        );
        assert_eq!(
            errno::ECONNABORTED,
            rustix::io::Errno::CONNABORTED.raw_os_error()
        );
        assert_eq!(
            errno::ECONNRESET,
            rustix::io::Errno::CONNRESET.raw_os_error()
        );
        assert_eq!(errno::ESHUTDOWN, rustix::io::Errno::SHUTDOWN.raw_os_error());
        assert_eq!(errno::ETIMEDOUT, rustix::io::Errno::TIMEDOUT.raw_os_error());
        assert_eq!(errno::ENOMEM, rustix::io::Errno::NOMEM.raw_os_error());
        assert_eq!(errno::EINVAL, rustix::io::Errno::INVAL.raw_os_error());
        assert_eq!(
            completion(TxStatus::EngineGone),
            Completion {
                errno: -107,
                health: Health::LocalAborted
            }
        );
        assert!(retried(TxStatus::EngineGone));
        assert!(retried(TxStatus::Shutdown));
        assert!(retried(TxStatus::PeerUnreachable));
        assert!(!retried(TxStatus::Ok));
        assert!(!retried(TxStatus::TimedOut));
        assert!(!retried(TxStatus::InvalidDescriptor));
        for v in 0..=8u32 {
            let s = TxStatus::try_from(v).unwrap();
            assert_eq!(completion(s).errno == 0, s == TxStatus::Ok, "{s:?}");
        }
    }
}
