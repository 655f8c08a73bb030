//! Reading files that hold secrets (session keys, injected credentials) and other small files:
//! a size bound (a bigger file is refused, never truncated), and for secrets a permission check
//! that no other user can read or change them. Errors are plain reasons; the caller names the key.

use std::io::Read;
use std::path::Path;

/// Reads a UTF-8 file of at most `max` bytes (a bigger one is refused, not truncated).
pub fn read_bounded(path: &Path, max: u64) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(text)
}

/// Reads a secret file (session keys, credentials) with a size bound: refused when others may
/// read or write it, or its group may write it; group read is allowed only when the file's group
/// is one of this process's own groups (a Kubernetes Secret volume with `fsGroup` is mode 0440,
/// group = the pod's fsGroup), so no other user can read it.
pub fn read_private(path: &Path, max: u64) -> Result<String, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if meta.is_dir() {
            return Err("is a directory: give the path of the file itself".into());
        }
        let mode = meta.mode();
        if !private_enough(mode, meta.gid(), &own_groups()) {
            return Err(format!(
                "mode {:04o} lets others (or a group this process is not in) read or change it; \
                 `chmod 600` it (Kubernetes: defaultMode: 0400; with fsGroup, 0440 is fine)",
                mode & 0o7777
            ));
        }
    }
    read_bounded(path, max)
}

/// True when a file with `mode` and group `gid` can be read by nobody but its owner and the
/// groups in `ours`.
pub fn private_enough(mode: u32, gid: u32, ours: &[u32]) -> bool {
    let group_reads_only = mode & 0o070 == 0o040;
    mode & 0o007 == 0 && (mode & 0o070 == 0 || (group_reads_only && ours.contains(&gid)))
}

/// This process's group ids (real, effective, supplementary), from `/proc/self/status`; empty
/// where that cannot be read.
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return vec![];
    };
    status
        .lines()
        .filter(|l| l.starts_with("Gid:") || l.starts_with("Groups:"))
        .flat_map(|l| l.split_whitespace().skip(1))
        .filter_map(|g| g.parse().ok())
        .collect()
}
