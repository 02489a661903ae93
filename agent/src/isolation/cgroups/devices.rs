//! The devices controller: a task may open only the device nodes of its allow-list
//! ([`Limits::devices`], built by `crate::isolation::devices::allow_list`). v1 writes
//! `devices.deny` / `devices.allow` through cgroups-rs's `DevicesController`; v2 has no
//! devices file and attaches a BPF program instead ([`super::bpf`]).

use std::path::Path;

use cgroups_rs::fs::devices::{DevicePermissions, DeviceType, DevicesController};

use super::super::devices::{DeviceKind, DeviceRule};
use super::{bpf, limit_err as err, CgroupError, Limits};

/// Denies every device, then allows the list. Nothing to do when the limits carry no list.
pub fn apply(dir: &Path, root: &Path, v2: bool, limits: &Limits) -> Result<(), CgroupError> {
    let Some(rules) = &limits.devices else {
        return Ok(());
    };
    if v2 {
        return bpf::attach(dir, rules);
    }
    let ctrl = DevicesController::new(dir.to_path_buf(), root.to_path_buf());
    // `a` empties the list and makes denial the default (the kernel ignores the rest).
    ctrl.deny_device(DeviceType::All, -1, -1, &DevicePermissions::all()).map_err(|e| err(dir, "devices.deny", e))?;
    for rule in rules {
        let (kind, major, minor, perms) = v1_parts(rule);
        ctrl.allow_device(kind, major, minor, &perms).map_err(|e| err(dir, "devices.allow", e))?;
    }
    Ok(())
}

/// A rule as cgroups-rs's arguments (-1 = any).
fn v1_parts(rule: &DeviceRule) -> (DeviceType, i64, i64, Vec<DevicePermissions>) {
    let kind = match rule.kind {
        DeviceKind::Char => DeviceType::Char,
        DeviceKind::Block => DeviceType::Block,
        DeviceKind::All => DeviceType::All,
    };
    let num = |n: Option<u32>| n.map_or(-1, i64::from);
    let perms = [(rule.read, DevicePermissions::Read), (rule.write, DevicePermissions::Write), (rule.mknod, DevicePermissions::MkNod)]
        .into_iter()
        .filter_map(|(on, p)| on.then_some(p))
        .collect();
    (kind, num(rule.major), num(rule.minor), perms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_writes_deny_all_then_the_list() -> Result<(), Box<dyn std::error::Error>> {
        // A fixture directory records what would be written (the last write of each file).
        let dir = tempfile::tempdir()?;
        for f in ["devices.allow", "devices.deny"] {
            std::fs::write(dir.path().join(f), "")?;
        }
        let limits = Limits { devices: Some(vec![DeviceRule::char_rwm(195, Some(1))]), ..Default::default() };
        apply(dir.path(), dir.path(), false, &limits)?;
        assert_eq!(std::fs::read_to_string(dir.path().join("devices.deny"))?, "a *:* rwm");
        assert_eq!(std::fs::read_to_string(dir.path().join("devices.allow"))?, "c 195:1 rwm");
        let ro = DeviceRule { kind: DeviceKind::Block, major: Some(7), minor: None, read: true, write: false, mknod: false };
        let (kind, major, minor, perms) = v1_parts(&ro);
        assert_eq!((kind.to_char(), major, minor, perms.len()), ('b', 7, -1, 1));
        // No list: nothing is touched.
        std::fs::write(dir.path().join("devices.deny"), "")?;
        apply(dir.path(), dir.path(), false, &Limits::default())?;
        assert_eq!(std::fs::read_to_string(dir.path().join("devices.deny"))?, "");
        Ok(())
    }
}
