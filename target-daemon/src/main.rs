//! `ftss-target`: the ftss iSCSI target daemon.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("ftss-target: not yet wired up")
}
