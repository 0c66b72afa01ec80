//! The workspace daemon's cache of directory listings: lookups in a directory the host
//! listed a moment ago are answered here, found or not, without a round trip to the host.
//!
//! A listing lives [`LISTING_TTL`] (as long as the kernel keeps an entry), so a change made
//! on the host is seen within that time plus the kernel's own TTL. Changes the guest makes
//! all pass through the daemon and update the listings at once: a created name is found, a
//! removed one is missing, and a changed file has the attributes the host answered with
//! (or is looked up again). Attribute requests (`getattr`) are answered here too. A listing
//! fetched while the guest changed anything is dropped rather than installed (it may predate
//! the change).
//! Only listings the host marks complete are kept (none while a VFS rule could hide a name).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use matchlock_protocol::vfs::{DirEntry, Stat};

/// How long a listing answers lookups.
pub(crate) const LISTING_TTL: Duration = Duration::from_secs(1);
/// Most directories whose listings (or recent misses) are kept.
const MAX_DIRS: usize = 256;
/// How long a directory found too large to keep is not listed for lookups again.
const LARGE_TTL: Duration = Duration::from_secs(10);

/// What the cache knows of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cached {
    /// It exists with these attributes.
    Found(Stat),
    /// It does not exist.
    Missing,
    /// Ask the host.
    Unknown,
}

struct Listing {
    fetched: Instant,
    /// Every name in the directory; `None`: it exists, its attributes changed since.
    names: HashMap<String, Option<Stat>>,
}

/// Directory listings by absolute guest path.
#[derive(Default)]
pub(crate) struct Listings {
    dirs: HashMap<String, Listing>,
    /// When a lookup in a directory last had to ask the host.
    misses: HashMap<String, Instant>,
    /// Directories too large to keep, and since when.
    large: HashMap<String, Instant>,
    /// Bumped by every change the guest makes.
    generation: u64,
}

/// The parent directory and the name of an absolute path (`None` for `/`).
fn split(path: &str) -> Option<(&str, &str)> {
    let at = path.rfind('/')?;
    let name = &path[at + 1..];
    if name.is_empty() {
        return None;
    }
    Some((if at == 0 { "/" } else { &path[..at] }, name))
}

fn beneath(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

impl Listings {
    /// What a fresh listing of `dir` says of `name`.
    pub(crate) fn lookup(&self, dir: &str, name: &str, now: Instant) -> Cached {
        match self.dirs.get(dir) {
            Some(listing) if now.duration_since(listing.fetched) < LISTING_TTL => match listing.names.get(name) {
                Some(Some(stat)) => Cached::Found(stat.clone()),
                Some(None) => Cached::Unknown,
                None => Cached::Missing,
            },
            _ => Cached::Unknown,
        }
    }

    /// Records that a lookup in `dir` asks the host, and tells whether listing `dir` is
    /// worth it: a second such lookup within the TTL, or a listing of it just expired (a
    /// single lookup in a large directory never lists it).
    pub(crate) fn worth_listing(&mut self, dir: &str, now: Instant) -> bool {
        if self.large.get(dir).is_some_and(|at| now.duration_since(*at) < LARGE_TTL) {
            return false;
        }
        let expired = self.dirs.get(dir).is_some_and(|l| now.duration_since(l.fetched) >= LISTING_TTL);
        let recent = self.misses.get(dir).is_some_and(|at| now.duration_since(*at) < LISTING_TTL);
        if self.misses.len() >= MAX_DIRS {
            self.misses.retain(|_, at| now.duration_since(*at) < LISTING_TTL);
            if self.misses.len() >= MAX_DIRS {
                self.misses.clear();
            }
        }
        self.misses.insert(dir.to_owned(), now);
        expired || recent
    }

    /// `dir` has more entries than a listing keeps: not worth listing for [`LARGE_TTL`].
    pub(crate) fn too_large(&mut self, dir: &str, now: Instant) {
        if self.large.len() >= MAX_DIRS {
            self.large.retain(|_, at| now.duration_since(*at) < LARGE_TTL);
            if self.large.len() >= MAX_DIRS {
                self.large.clear();
            }
        }
        self.large.insert(dir.to_owned(), now);
    }

    /// The current generation: pass it to [`Listings::install`] with a listing fetched after.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Keeps the host's complete listing of `dir`, fetched at `generation`, unless the guest
    /// changed something since.
    pub(crate) fn install(&mut self, dir: &str, generation: u64, entries: &[DirEntry], now: Instant) {
        if generation != self.generation {
            return;
        }
        if self.dirs.len() >= MAX_DIRS && !self.dirs.contains_key(dir) {
            self.dirs.retain(|_, l| now.duration_since(l.fetched) < LISTING_TTL);
            if self.dirs.len() >= MAX_DIRS {
                self.dirs.clear();
            }
        }
        let names = entries.iter().map(|e| (e.name.clone(), Some(e.stat()))).collect();
        self.dirs.insert(dir.to_owned(), Listing { fetched: now, names });
        self.misses.remove(dir);
    }

    /// The guest made `path` (a file, directory or link), with `stat` if known. A new
    /// directory starts with an empty listing of its own.
    pub(crate) fn created(&mut self, path: &str, stat: Option<Stat>, now: Instant) {
        self.generation += 1;
        let is_dir = stat.as_ref().is_some_and(|s| s.is_dir);
        if let Some((dir, name)) = split(path) {
            if let Some(listing) = self.dirs.get_mut(dir) {
                listing.names.insert(name.to_owned(), stat);
            }
        }
        if is_dir && self.dirs.len() < MAX_DIRS {
            self.dirs.insert(path.to_owned(), Listing { fetched: now, names: HashMap::new() });
        }
    }

    /// What a fresh listing knows of `path`'s attributes.
    pub(crate) fn known(&self, path: &str, now: Instant) -> Option<Stat> {
        let (dir, name) = split(path)?;
        match self.lookup(dir, name, now) {
            Cached::Found(stat) => Some(stat),
            _ => None,
        }
    }

    /// The guest wrote to `path`; the host says it now has `after`'s size and modification
    /// time (writes only ever grow them: answers arriving out of order keep the largest).
    pub(crate) fn wrote(&mut self, path: &str, after: &Stat) {
        self.generation += 1;
        if let Some((dir, name)) = split(path) {
            if let Some(Some(stat)) = self.dirs.get_mut(dir).and_then(|l| l.names.get_mut(name)) {
                stat.size = stat.size.max(after.size);
                if (after.mtime, after.mtime_nsec) > (stat.mtime, stat.mtime_nsec) {
                    (stat.mtime, stat.mtime_nsec) = (after.mtime, after.mtime_nsec);
                }
            }
        }
    }

    /// The guest is changing `path`'s attributes or content: until it knows the attributes
    /// `after` the change (the host's answer), the next lookup asks the host.
    pub(crate) fn changed(&mut self, path: &str, after: Option<&Stat>) {
        self.generation += 1;
        if let Some((dir, name)) = split(path) {
            if let Some(entry) = self.dirs.get_mut(dir).and_then(|l| l.names.get_mut(name)) {
                *entry = after.cloned();
            }
        }
    }

    /// The guest removed `path`: it is missing, and so is everything beneath it.
    pub(crate) fn removed(&mut self, path: &str) {
        self.generation += 1;
        self.dirs.retain(|dir, _| !beneath(dir, path));
        if let Some((dir, name)) = split(path) {
            if let Some(listing) = self.dirs.get_mut(dir) {
                listing.names.remove(name);
            }
        }
    }

    /// The guest renamed `from` to `to` (replacing it).
    pub(crate) fn renamed(&mut self, from: &str, to: &str) {
        self.removed(from);
        self.removed(to);
        if let Some((dir, name)) = split(to) {
            if let Some(listing) = self.dirs.get_mut(dir) {
                listing.names.insert(name.to_owned(), None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, size: u64) -> DirEntry {
        DirEntry::new(name.to_owned(), &Stat { size, mode: 0o100_644, ..Stat::default() })
    }

    #[test]
    fn a_fresh_listing_answers_found_and_missing_until_it_expires() {
        let mut cache = Listings::default();
        let t0 = Instant::now();
        assert_eq!(cache.lookup("/w", "a", t0), Cached::Unknown);
        assert!(!cache.worth_listing("/w", t0), "one lookup in a directory does not list it");
        assert!(cache.worth_listing("/w", t0), "a second one does");
        cache.install("/w", cache.generation(), &[entry("a", 3)], t0);
        assert!(matches!(cache.lookup("/w", "a", t0), Cached::Found(s) if s.size == 3));
        assert_eq!(cache.lookup("/w", "b", t0), Cached::Missing);
        assert_eq!(cache.lookup("/other", "a", t0), Cached::Unknown);
        let later = t0 + LISTING_TTL;
        assert_eq!(cache.lookup("/w", "b", later), Cached::Unknown, "expired: the host is asked again");
        assert!(cache.worth_listing("/w", later), "an expired listing is fetched again at once");
        cache.too_large("/big", t0);
        assert!(!cache.worth_listing("/big", t0) && !cache.worth_listing("/big", t0), "too large to keep: not listed");
        let after = t0 + LARGE_TTL;
        assert!(!cache.worth_listing("/big", after) && cache.worth_listing("/big", after), "after a while as before");
    }

    #[test]
    fn the_guests_own_changes_show_at_once() {
        let mut cache = Listings::default();
        let t0 = Instant::now();
        cache.install("/w", cache.generation(), &[entry("a", 3), entry("old", 1)], t0);
        let stat = Stat { size: 0, mode: 0o040_755, is_dir: true, ..Stat::default() };
        cache.created("/w/d", Some(stat.clone()), t0);
        assert_eq!(cache.lookup("/w", "d", t0), Cached::Found(stat));
        assert_eq!(cache.lookup("/w/d", "x", t0), Cached::Missing, "a new directory is empty");
        cache.wrote("/w/a", &Stat { size: 9, mtime: 7, ..Stat::default() });
        cache.wrote("/w/a", &Stat { size: 4, mtime: 6, ..Stat::default() });
        let written = cache.known("/w/a", t0).unwrap();
        assert_eq!((written.size, written.mtime), (9, 7), "the largest size and latest time win");
        cache.changed("/w/a", None);
        assert_eq!(cache.lookup("/w", "a", t0), Cached::Unknown, "a file being changed is looked up again");
        assert_eq!(cache.known("/w/a", t0), None);
        let after = Stat { size: 0, mode: 0o100_600, mtime: 8, ..Stat::default() };
        cache.changed("/w/a", Some(&after));
        assert_eq!(cache.known("/w/a", t0), Some(after), "the host's attributes after the change");
        cache.changed("/w/gone", Some(&Stat::default()));
        assert_eq!(cache.lookup("/w", "gone", t0), Cached::Missing, "a change never adds a name");
        assert_eq!(cache.known("/w/a", t0 + LISTING_TTL), None, "and expires with the listing");
        cache.removed("/w/old");
        assert_eq!(cache.lookup("/w", "old", t0), Cached::Missing);
        cache.created("/w/d/x", None, t0);
        cache.renamed("/w/d", "/w/e");
        assert_eq!(cache.lookup("/w", "d", t0), Cached::Missing);
        assert_eq!(cache.lookup("/w", "e", t0), Cached::Unknown);
        assert_eq!(cache.lookup("/w/d", "x", t0), Cached::Unknown, "listings beneath a moved directory are gone");
        assert_eq!(cache.lookup("/w/e", "x", t0), Cached::Unknown);
    }

    #[test]
    fn a_listing_fetched_across_a_change_is_dropped() {
        let mut cache = Listings::default();
        let t0 = Instant::now();
        let before = cache.generation();
        cache.created("/w/new", None, t0);
        cache.install("/w", before, &[entry("a", 1)], t0);
        assert_eq!(cache.lookup("/w", "new", t0), Cached::Unknown, "not installed: it may predate the create");
    }

    #[test]
    fn the_cache_stays_bounded() {
        let mut cache = Listings::default();
        let t0 = Instant::now();
        for i in 0..MAX_DIRS * 3 {
            let dir = format!("/w/{i}");
            cache.worth_listing(&dir, t0);
            cache.install(&dir, cache.generation(), &[entry("a", 1)], t0);
        }
        assert!(cache.dirs.len() <= MAX_DIRS && cache.misses.len() <= MAX_DIRS);
        assert_eq!(split("/a"), Some(("/", "a")));
        assert_eq!(split("/"), None);
        assert!(beneath("/w/d/x", "/w/d") && !beneath("/w/dd", "/w/d"));
    }
}
