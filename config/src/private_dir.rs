//! The directories ward keeps keys in: the server's `data_dir` and the proxy's
//! `control_plane.state_dir` (security rule 11, server state, docs/security.md).
//!
//! A missing directory is created with mode 0700. An existing one is used as it is when it
//! already has mode 0700 and belongs to the running user, and tightened to 0700 when it belongs
//! to the running user and holds nothing or only ward's own files. Anything else (another
//! owner, world-writable, sticky, someone else's files) is refused and never chmod-ed: a wrong
//! path such as `/tmp` must not be changed under the host, and a directory others can write
//! into is no place for keys. PostgreSQL checks its data directory the same way.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Why a directory cannot hold ward's keys. The messages read after the directory's path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivateDirError {
    #[error("cannot create it: {0}")]
    Create(std::io::Error),
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error("is not a directory")]
    NotADirectory,
    #[error(
        "has mode {mode:04o} and belongs to uid {owner}, not to the running user (uid {me}); \
         ward keeps keys only in a directory of its own and left this one unchanged"
    )]
    OtherOwner { mode: u32, owner: u32, me: u32 },
    #[error(
        "has mode {mode:04o}, which is {why}; ward keeps keys only in a directory of its own \
         and left this one unchanged"
    )]
    Shared { mode: u32, why: &'static str },
    #[error(
        "has mode {mode:04o} and holds {name:?}, which is not ward's; ward tightens to 0700 only \
         a directory holding nothing or its own files, and left this one unchanged"
    )]
    ForeignFile { mode: u32, name: String },
    #[error(
        "has mode {mode:04o} and holds {name:?}, which {what}; ward tightens to 0700 only a \
         directory holding nothing or its own files, and left this one unchanged"
    )]
    ForeignEntry {
        mode: u32,
        name: String,
        what: String,
    },
    #[error("has mode {mode:04o} and cannot be set to 0700: {source}")]
    Chmod { mode: u32, source: std::io::Error },
}

/// Creates `dir` (0700) if missing, else checks it and tightens it to 0700 as the module
/// documentation says. `own_files` are the names ward itself writes there.
pub fn prepare(dir: &Path, own_files: &[&str]) -> Result<(), PrivateDirError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(PrivateDirError::Create)?;
    }
    let meta = fs::metadata(dir).map_err(PrivateDirError::Read)?;
    if !meta.is_dir() {
        return Err(PrivateDirError::NotADirectory);
    }
    let mode = meta.permissions().mode() & 0o7777;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(PrivateDirError::OtherOwner {
            mode,
            owner: meta.uid(),
            me,
        });
    }
    if let Some(why) = shared_why(mode) {
        return Err(PrivateDirError::Shared { mode, why });
    }
    if mode == 0o700 {
        return Ok(());
    }
    // Only ours, and only holding what ward put there: then the loose mode was an accident.
    for entry in fs::read_dir(dir).map_err(PrivateDirError::Read)? {
        let entry = entry.map_err(PrivateDirError::Read)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !own_files.contains(&name.as_str()) {
            return Err(PrivateDirError::ForeignFile { mode, name });
        }
        // A name is not enough: someone who could write into the directory may have made a
        // file with ward's name first (and kept it open), for ward to write a key into.
        let meta = fs::symlink_metadata(entry.path()).map_err(PrivateDirError::Read)?;
        let what = if !meta.file_type().is_file() {
            Some("is not a regular file".to_owned())
        } else if meta.uid() != me {
            Some(format!(
                "belongs to uid {}, not to the running user",
                meta.uid()
            ))
        } else {
            None
        };
        if let Some(what) = what {
            return Err(PrivateDirError::ForeignEntry { mode, name, what });
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|source| PrivateDirError::Chmod { mode, source })
}

/// Why a mode marks a directory others may write into, if it does.
fn shared_why(mode: u32) -> Option<&'static str> {
    let world_writable = mode & 0o002 != 0;
    let sticky = mode & 0o1000 != 0;
    match (world_writable, sticky) {
        (true, true) => Some("world-writable and sticky (a shared directory such as /tmp)"),
        (true, false) => Some("world-writable"),
        (false, true) => Some("sticky (the mark of a shared directory)"),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("ward-private-dir-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir(&p).unwrap();
            Dir(p)
        }
        fn set_mode(&self, mode: u32) {
            fs::set_permissions(&self.0, fs::Permissions::from_mode(mode)).unwrap();
        }
        fn mode(&self) -> u32 {
            fs::metadata(&self.0).unwrap().permissions().mode() & 0o7777
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn creates_a_missing_directory_0700() {
        let d = Dir::new("missing");
        let inner = d.0.join("a/b");
        prepare(&inner, &[]).unwrap();
        let mode = fs::metadata(&inner).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn tightens_an_own_directory_holding_only_ward_files() {
        let d = Dir::new("own");
        d.set_mode(0o755);
        prepare(&d.0, &["key.pem"]).unwrap();
        assert_eq!(d.mode(), 0o700, "empty");
        d.set_mode(0o750);
        fs::write(d.0.join("key.pem"), "x").unwrap();
        prepare(&d.0, &["key.pem"]).unwrap();
        assert_eq!(d.mode(), 0o700, "only ward's file");
    }

    #[test]
    fn refuses_and_leaves_alone_what_is_not_its_own() {
        for (mode, file, want) in [
            (0o1777, None, "world-writable and sticky"),
            (0o1777, Some("other"), "1777"),
            (0o777, None, "world-writable"),
            (0o1700, None, "sticky"),
            (0o755, Some("notes.txt"), "notes.txt"),
        ] {
            let d = Dir::new(&format!("refuse-{mode:o}"));
            if let Some(f) = file {
                fs::write(d.0.join(f), "x").unwrap();
            }
            d.set_mode(mode);
            let e = prepare(&d.0, &["key.pem"]).unwrap_err().to_string();
            assert!(e.contains(want), "{mode:o}: {e}");
            assert!(e.contains(&format!("{mode:04o}")), "names the mode: {e}");
            assert_eq!(d.mode(), mode, "left unchanged: {e}");
        }
    }

    #[test]
    fn a_file_with_wards_name_that_is_not_wards_is_refused() {
        let d = Dir::new("foreign-entry");
        fs::create_dir(d.0.join("key.pem")).unwrap();
        d.set_mode(0o770);
        let e = prepare(&d.0, &["key.pem"]).unwrap_err().to_string();
        assert!(
            e.contains("key.pem") && e.contains("not a regular file"),
            "{e}"
        );
        assert_eq!(d.mode(), 0o770, "left unchanged: {e}");

        let d = Dir::new("foreign-owner");
        fs::write(d.0.join("key.tmp"), "").unwrap();
        // Only root can give a file away; elsewhere this case cannot be built.
        if std::os::unix::fs::chown(d.0.join("key.tmp"), Some(65534), None).is_err() {
            eprintln!("SKIPPED: a file of another owner (needs root to chown)");
            return;
        }
        d.set_mode(0o770);
        let e = prepare(&d.0, &["key.tmp"]).unwrap_err().to_string();
        assert!(e.contains("key.tmp") && e.contains("uid 65534"), "{e}");
        assert_eq!(d.mode(), 0o770, "left unchanged: {e}");
    }

    #[test]
    fn a_0700_directory_of_its_own_is_used_as_it_is() {
        let d = Dir::new("as-is");
        d.set_mode(0o700);
        fs::write(d.0.join("README"), "x").unwrap();
        prepare(&d.0, &[]).unwrap();
        assert_eq!(d.mode(), 0o700);
    }

    #[test]
    fn another_owner_is_refused() {
        let d = Dir::new("owner");
        d.set_mode(0o755);
        // Only root can give a directory away; elsewhere this case cannot be built.
        if std::os::unix::fs::chown(&d.0, Some(65534), None).is_err() {
            eprintln!("SKIPPED: a directory of another owner (needs root to chown)");
            return;
        }
        let e = prepare(&d.0, &[]).unwrap_err().to_string();
        assert!(e.contains("uid 65534") && e.contains("0755"), "{e}");
        assert_eq!(d.mode(), 0o755);
    }

    #[test]
    fn a_file_is_not_a_directory() {
        let d = Dir::new("file");
        let f = d.0.join("f");
        fs::write(&f, "x").unwrap();
        assert!(matches!(
            prepare(&f, &[]),
            Err(PrivateDirError::NotADirectory)
        ));
    }
}
