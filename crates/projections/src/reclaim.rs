//! Deleting retired generation trees.
//!
//! sled 0.34.7 deletes a tree in one of two ways, both measured on the replay bench's
//! 1 000 000-event store (3.6 million rows, 1.2 GB): `Db::drop_tree` frees every page under one
//! epoch guard, so nothing it reads is released before the end (5 s, the process from 400 MB to
//! 2.3 GB); removing the keys in batches bounds memory but costs about 10 µs a key (37 s, half of
//! a fresh replay). So a generation retired by a replay is deleted in batches on a thread of its
//! own: the new generation answers as soon as it is installed, and the rows nobody reads any
//! more go while the process works. A process that ends first stops the deletion between two
//! batches and leaves the rest of the tree, which the next open reclaims (as it reclaims the
//! leftover of a replay that crashed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::ProjectionError;

/// Keys removed per batch.
const BATCH: usize = 4096;

/// Deletes the tree `name` with bounded memory: its keys in batches, then the empty tree.
/// Returns `Ok(false)` when `stop` was set before it finished (the tree is left, smaller).
pub(crate) fn reclaim_tree(
    db: &sled::Db,
    name: &[u8],
    stop: &AtomicBool,
) -> Result<bool, ProjectionError> {
    let tree = db.open_tree(name)?;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for key in tree.iter().keys().take(BATCH) {
            batch.remove(key?);
            n += 1;
        }
        if n == 0 {
            break;
        }
        tree.apply_batch(batch)?;
    }
    drop(tree);
    db.drop_tree(name)?;
    Ok(true)
}

/// [`reclaim_tree`] to the end.
pub(crate) fn reclaim_now(db: &sled::Db, name: &[u8]) -> Result<(), ProjectionError> {
    reclaim_tree(db, name, &AtomicBool::new(false)).map(|_| ())
}

/// [`reclaim_tree`], its outcome logged: a tree not deleted is left for the next open, which
/// nothing reads meanwhile.
fn reclaim_logged(db: &sled::Db, name: &str, stop: &AtomicBool) {
    let started = std::time::Instant::now();
    match reclaim_tree(db, name.as_bytes(), stop) {
        Ok(true) => tracing::info!(
            tree = %name,
            seconds = started.elapsed().as_secs_f64(),
            "retired projection generation reclaimed"
        ),
        Ok(false) => tracing::info!(
            tree = %name,
            "reclaiming a retired projection generation stopped; the next open goes on"
        ),
        Err(e) => {
            tracing::warn!(tree = %name, error = %e, "retired projection generation not reclaimed")
        }
    }
}

/// The background deletions of one [`crate::Projections`].
#[derive(Default)]
pub(crate) struct Reclaimer {
    stop: Arc<AtomicBool>,
    running: Mutex<Vec<JoinHandle<()>>>,
}

impl Reclaimer {
    /// Deletes `name` on a thread of its own (here, when no thread can be started).
    pub(crate) fn spawn(&self, db: &sled::Db, name: String) {
        let stop = Arc::clone(&self.stop);
        let (thread_db, thread_name) = (db.clone(), name.clone());
        let spawned = std::thread::Builder::new()
            .name("caseledger-reclaim".into())
            .spawn(move || reclaim_logged(&thread_db, &thread_name, &stop));
        match spawned {
            Ok(handle) => self.lock().push(handle),
            Err(e) => {
                tracing::warn!(error = %e, "no reclaim thread; reclaiming in place");
                reclaim_logged(db, &name, &self.stop);
            }
        }
    }

    /// Waits until every deletion started so far has ended.
    pub(crate) fn wait(&self) {
        let running = std::mem::take(&mut *self.lock());
        for handle in running {
            // A reclaim that panicked left its tree to the next open.
            let _ = handle.join();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        match self.running.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Drop for Reclaimer {
    /// Stops the deletions between two batches and waits for them: the tree they leave is a
    /// leftover the next open reclaims, and no thread keeps the store open past its owner.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(rows: usize) -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let tree = db.open_tree("proj/d/1").expect("tree");
        for i in 0..rows as u64 {
            tree.insert(i.to_be_bytes(), &[7u8; 8]).expect("insert");
        }
        (dir, db)
    }

    #[test]
    fn a_stopped_reclaim_leaves_the_tree_and_a_later_one_deletes_it() {
        let (_dir, db) = store_with(BATCH * 2 + 1);
        let stop = AtomicBool::new(true);
        assert!(!reclaim_tree(&db, b"proj/d/1", &stop).expect("stopped"));
        assert_eq!(db.open_tree("proj/d/1").expect("tree").len(), BATCH * 2 + 1);
        assert!(reclaim_tree(&db, b"proj/d/1", &AtomicBool::new(false)).expect("reclaim"));
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"proj/d/1"));
    }

    #[test]
    fn a_background_reclaim_deletes_the_tree_and_wait_returns_when_it_is_gone() {
        let (_dir, db) = store_with(BATCH * 3);
        let reclaimer = Reclaimer::default();
        reclaimer.spawn(&db, "proj/d/1".into());
        reclaimer.wait();
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"proj/d/1"));
    }

    #[test]
    fn dropping_the_reclaimer_stops_it_and_releases_the_store() {
        let (_dir, db) = store_with(BATCH * 8);
        let reclaimer = Reclaimer::default();
        reclaimer.spawn(&db, "proj/d/1".into());
        drop(reclaimer);
        // Nothing runs any more: whatever is left stays as it is.
        let left = db.open_tree("proj/d/1").map(|t| t.len()).unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(db.open_tree("proj/d/1").map(|t| t.len()).unwrap_or(0), left);
    }
}
