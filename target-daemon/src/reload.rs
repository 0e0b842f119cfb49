//! What a configuration reload (SIGHUP) may change while sessions stay up, decided
//! without touching the running daemon: [`plan`] compares the file just read with the
//! configuration in force and says what to put in force, or which key stops the reload.
//!
//! Reloaded: target ACLs (`initiators`), `reset_initiators`, CHAP secrets (targets',
//! nodes' and discovery's), `[[node]]` entries new in the file and plain-file LUNs new
//! in the file. A LUN removed or changed (path, mirrors, size, block size), a new
//! mirrored LUN (its set joins the write cache at start) and a target added or removed
//! refuse the reload. Other
//! changes (portals, limits, media, packets, aliases, LUN masking, the addresses of a
//! node already known) are left for a restart and named in [`Plan::restart_needed`].

use std::net::IpAddr;

use crate::config::{Config, ConfigError, LunConfig, ResolvedConfig};

/// What a reload puts in force.
#[derive(Debug)]
pub struct Plan {
    /// The configuration logins read from now on: the running one with the reloadable
    /// parts taken from the file.
    pub config: Config,
    /// Keys whose change in the file waits for a restart.
    pub restart_needed: Vec<String>,
    /// `[[node]]` entries new in the file: (index in the file, initiator, addresses).
    pub nodes_added: Vec<(usize, String, Vec<IpAddr>)>,
    /// Plain-file LUNs new in the file.
    pub luns_added: Vec<AddedLun>,
    /// Whether any ACL, CHAP secret or node differs from what was in force.
    pub changed: bool,
}

/// A plain-file LUN new in the file.
#[derive(Debug)]
pub struct AddedLun {
    /// Its target's IQN.
    pub iqn: String,
    /// Its key, `target[i].lun[j]`.
    pub key: String,
    /// The LUN as written.
    pub lun: LunConfig,
    /// Its size in bytes.
    pub size_bytes: u64,
}

fn refuse(key: String, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        msg: msg.into(),
    }
}

/// Compares `new` (parsed and validated) with `running` and plans the reload.
pub fn plan(running: &Config, resolved: &ResolvedConfig) -> Result<Plan, ConfigError> {
    let new = resolved.file();
    let mut restart_needed = Vec::new();
    let mut note = |differs: bool, key: String| {
        if differs {
            restart_needed.push(key);
        }
    };
    for (i, t) in running.targets.iter().enumerate() {
        if new.target(&t.iqn).is_none() {
            return Err(refuse(
                format!("target[{i}]"),
                format!(
                    "{} is not in the file; removing a target needs a restart",
                    t.iqn
                ),
            ));
        }
    }
    let mut config = running.clone();
    let mut luns_added = Vec::new();
    for (j, nt) in new.targets.iter().enumerate() {
        let Some(rt) = config
            .targets
            .iter_mut()
            .find(|t| t.iqn.eq_ignore_ascii_case(&nt.iqn))
        else {
            return Err(refuse(
                format!("target[{j}].iqn"),
                format!("{} is new; adding a target needs a restart", nt.iqn),
            ));
        };
        for rl in &rt.luns {
            if !nt.luns.iter().any(|l| l.lun == rl.lun) {
                return Err(refuse(
                    format!("target[{j}].lun"),
                    format!(
                        "LUN {} is not in the file; removing a LUN needs a restart",
                        rl.lun
                    ),
                ));
            }
        }
        for (k, nl) in nt.luns.iter().enumerate() {
            let key = format!("target[{j}].lun[{k}]");
            let Some(rl) = rt.luns.iter().find(|l| l.lun == nl.lun) else {
                if nl.path.is_none() {
                    return Err(refuse(
                        key,
                        format!("LUN {} is new and mirrored; that needs a restart", nl.lun),
                    ));
                }
                let size_bytes = resolved.lun_sizes[j][k];
                luns_added.push(AddedLun {
                    iqn: nt.iqn.clone(),
                    key,
                    lun: nl.clone(),
                    size_bytes,
                });
                continue;
            };
            let storage = [
                ("path", rl.path != nl.path),
                ("mirrors", rl.mirrors != nl.mirrors),
                ("size", rl.size != nl.size),
                ("block_size", rl.block_size != nl.block_size),
            ];
            if let Some((field, _)) = storage.iter().find(|(_, differs)| *differs) {
                return Err(refuse(
                    format!("{key}.{field}"),
                    format!("LUN {}'s storage changed; that needs a restart", nl.lun),
                ));
            }
            note(
                rl.initiators != nl.initiators
                    || rl.read_only != nl.read_only
                    || rl.removable != nl.removable,
                key,
            );
        }
        rt.luns.extend(
            luns_added
                .iter()
                .filter(|a| a.iqn == nt.iqn)
                .map(|a| a.lun.clone()),
        );
        note(rt.alias != nt.alias, format!("target[{j}].alias"));
        rt.initiators = nt.initiators.clone();
        rt.chap = nt.chap.clone();
        rt.reset_initiators = nt.reset_initiators.clone();
    }
    // Debug text compares the sections whose types have no PartialEq; only the key is
    // ever shown, never the text (it holds secrets).
    let mut server = new.server.clone();
    server.discovery_chap = running.server.discovery_chap.clone();
    note(
        format!("{server:?}") != format!("{:?}", running.server),
        "server".into(),
    );
    note(
        format!("{:?}", new.media) != format!("{:?}", running.media),
        "media".into(),
    );
    note(
        format!("{:?}", new.packets) != format!("{:?}", running.packets),
        "packets".into(),
    );
    config.server.discovery_chap = new.server.discovery_chap.clone();
    let mut nodes_added = Vec::new();
    for (i, n) in new.nodes.iter().enumerate() {
        match running
            .nodes
            .iter()
            .find(|r| r.initiator.eq_ignore_ascii_case(&n.initiator))
        {
            Some(r) => note(r.addresses != n.addresses, format!("node[{i}].addresses")),
            None => nodes_added.push((i, n.initiator.clone(), resolved.node_addresses[i].clone())),
        }
    }
    for (i, r) in running.nodes.iter().enumerate() {
        let kept = new
            .nodes
            .iter()
            .any(|n| n.initiator.eq_ignore_ascii_case(&r.initiator));
        // Its CHAP secret goes with the entry now; its routes stay until a restart.
        note(!kept, format!("node[{i}] ({})", r.initiator));
    }
    config.nodes = new.nodes.clone();
    let changed = !luns_added.is_empty()
        || format!("{:?}", config.targets) != format!("{:?}", running.targets)
        || format!("{:?}", config.nodes) != format!("{:?}", running.nodes)
        || format!("{:?}", config.server.discovery_chap)
            != format!("{:?}", running.server.discovery_chap);
    Ok(Plan {
        config,
        restart_needed,
        nodes_added,
        luns_added,
        changed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
portals = ["127.0.0.1:3260"]
[[target]]
iqn = "iqn.2026-12.x:t"
initiators = ["iqn.2026-12.x:a"]
[[target.lun]]
lun = 0
path = "lun0.img"
size = "16MiB"
"#;

    fn cfg(text: &str) -> Config {
        Config::parse(text).expect("valid")
    }

    fn resolved(text: &str) -> ResolvedConfig {
        cfg(text).resolve().expect("valid")
    }

    fn refused(new: &str) -> String {
        match plan(&cfg(BASE), &resolved(new)) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn acl_and_chap_changes_are_taken() {
        let new = BASE
            .replace("\"iqn.2026-12.x:a\"", "\"iqn.2026-12.x:b\"")
            .replace(
                "[[target.lun]]",
                "[target.chap]\nusername = \"u\"\nsecret = \"secret-12345\"\n[[target.lun]]",
            );
        let p = plan(&cfg(BASE), &resolved(&new)).expect("reloadable");
        assert!(p.changed);
        assert!(p.restart_needed.is_empty(), "{:?}", p.restart_needed);
        assert!(p.config.target_allows("iqn.2026-12.x:t", "iqn.2026-12.x:b"));
        assert!(!p.config.target_allows("iqn.2026-12.x:t", "iqn.2026-12.x:a"));
        let chap = p.config.targets[0].chap.as_ref().expect("chap");
        assert_eq!(chap.secret, "secret-12345");
        let same = plan(&cfg(BASE), &resolved(BASE)).expect("same file");
        assert!(!same.changed);
    }

    #[test]
    fn new_nodes_are_added_and_other_changes_wait_for_a_restart() {
        let new = format!(
            "{}[[node]]\ninitiator = \"iqn.2026-12.x:n\"\naddresses = [\"10.0.0.7\"]\n",
            BASE.replace("3260", "3261")
        );
        let p = plan(&cfg(BASE), &resolved(&new)).expect("reloadable");
        assert_eq!(
            p.nodes_added,
            vec![(
                0,
                "iqn.2026-12.x:n".to_owned(),
                vec![IpAddr::from([10, 0, 0, 7])]
            )]
        );
        assert_eq!(p.restart_needed, vec!["server".to_owned()]);
        assert_eq!(p.config.server.portals, vec!["127.0.0.1:3260".to_owned()]);
    }

    #[test]
    fn a_new_plain_file_lun_is_added() {
        let new = format!("{BASE}[[target.lun]]\nlun = 4\npath = \"lun4.img\"\nsize = \"1MiB\"\n");
        let p = plan(&cfg(BASE), &resolved(&new)).expect("reloadable");
        assert!(p.changed);
        assert_eq!(p.luns_added.len(), 1);
        assert_eq!(p.luns_added[0].iqn, "iqn.2026-12.x:t");
        assert_eq!(p.luns_added[0].key, "target[0].lun[1]");
        assert_eq!(p.luns_added[0].lun.lun, 4);
        assert_eq!(p.luns_added[0].size_bytes, 1 << 20);
        assert_eq!(
            p.config.targets[0].luns.len(),
            2,
            "in force with the new LUN"
        );
    }

    #[test]
    fn storage_and_target_changes_are_refused_with_their_key() {
        let e = refused(&BASE.replace("16MiB", "32MiB"));
        assert!(e.starts_with("target[0].lun[0].size:"), "{e}");
        let e = refused(&format!(
            "{BASE}[media]\ncache_size = \"8MiB\"\n[[target.lun]]\nlun = 1\nmirrors = [\"a\", \"b\"]\nsize = \"1MiB\"\n"
        ));
        assert!(e.starts_with("target[0].lun[1]:"), "{e}");
        let e = refused(&BASE.replace("lun = 0", "lun = 2"));
        assert!(e.starts_with("target[0].lun:"), "{e}");
        let e = refused(&BASE.replace("x:t", "x:u"));
        assert!(e.starts_with("target[0]:"), "{e}");
    }
}
