//! What a relay keeps of the store on its own disk (`[store] state_dir`): the last snapshot it
//! loaded, so that it starts serving its tenants while the database is down, and the usage it
//! has not flushed yet, so that a restart loses none of it. Each file is written whole to a
//! temporary name and renamed over the old one, readable by the relay's user only (the
//! snapshot holds the tenants' secrets, as the database does).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{Snapshot, UsageRow};

const SNAPSHOT: &str = "store-snapshot.json";
const SPOOL: &str = "usage-spool.json";

/// The relay's state folder.
#[derive(Debug, Clone)]
pub struct Local {
    dir: PathBuf,
}

/// A snapshot as saved, with when it was loaded from the database.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedSnapshot {
    pub saved_at: u64,
    pub snapshot: Snapshot,
}

/// Usage not yet in the store: the flush on its way (under its key) and what came after.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spool {
    /// This relay's flush key: its name and a random part drawn when it first spooled, so
    /// that two relays of one name never share keys.
    pub relay: String,
    /// The next flush's sequence number.
    pub next: u64,
    /// The flush written or being written, retried under the same key until it is in.
    pub flushing: Option<(u64, Vec<UsageRow>)>,
    /// Usage gathered since.
    pub open: Vec<UsageRow>,
}

impl Local {
    /// The folder `dir`, made if missing; an error that says why it cannot hold the files.
    pub fn open(dir: &Path) -> Result<Local, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let probe = dir.join(".turnpike-write-test");
        std::fs::write(&probe, b"").map_err(|e| format!("{}: not writable: {e}", dir.display()))?;
        let _ = std::fs::remove_file(probe);
        Ok(Local {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn save_snapshot(&self, s: &SavedSnapshot) -> std::io::Result<()> {
        self.write(SNAPSHOT, s)
    }

    pub fn load_snapshot(&self) -> Option<SavedSnapshot> {
        self.read(SNAPSHOT)
    }

    pub fn save_spool(&self, s: &Spool) -> std::io::Result<()> {
        self.write(SPOOL, s)
    }

    pub fn load_spool(&self) -> Option<Spool> {
        self.read(SPOOL)
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        serde_json::to_writer(&mut f, value)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(name))
    }

    fn read<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        let path = self.dir.join(name);
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable, ignored");
                None
            }
        }
    }
}
