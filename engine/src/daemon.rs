//! The daemon: attaches to kshim, starts one core thread per configured core, serves
//! statistics, and shuts down cleanly on SIGTERM.

use crate::config::Config;

/// Runs the engine until SIGTERM/SIGINT.
pub fn run(_cfg: Config) -> anyhow::Result<()> {
    anyhow::bail!("engine run: integration with kshim not finished yet")
}
