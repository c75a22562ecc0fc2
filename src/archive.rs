//! The release artifact: a manifest of the app tree and a deterministic, streamed tar.gz of it.
//!
//! The manifest lists every entry in a fixed order with its type, mode, size and content sha256. Its
//! own sha256 identifies the artifact, so the same tree always has the same identity, whatever part
//! of it a push actually sends.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ignore::WalkBuilder;
use ignore::overrides::OverrideBuilder;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Name of the manifest inside every release directory; a complete release always has it, because
/// it is the last entry of the archive.
pub const MANIFEST_NAME: &str = ".crucible-manifest";

/// First line of a manifest file, followed by the artifact sha256.
pub const MANIFEST_HEADER: &str = "# crucible manifest v1";

/// Modification time given to every entry: 2000-01-01T00:00:00Z. A fixed value makes archives
/// reproducible; it stays after 1980 so that tools building zip files from the tree accept it.
pub const FIXED_MTIME: u64 = 946_684_800;

/// Size of the read buffer each scan thread hashes files through.
const HASH_BUFFER_SIZE: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to walk the app directory {path}: {message}")]
    Walk { path: PathBuf, message: String },

    #[error("invalid exclude pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },

    #[error(
        "unsupported file name {path:?}: tabs and newlines are not allowed in deployed paths; rename or exclude it"
    )]
    Name { path: String },
}

/// The type of an entry, with the data that type carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    File { size: u64, sha256: String },
    Symlink { target: String },
}

/// One path of the app tree, relative to the source directory, with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub mode: u32,
    pub kind: EntryKind,
}

/// The listing of an app tree and its identity.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub source: PathBuf,
    pub entries: Vec<Entry>,
    pub sha256: String,
}

impl Manifest {
    /// Walks `source`, honouring .gitignore, .crucibleignore and `exclude`, and hashes every file.
    ///
    /// `.git` is always left out and symlinks are stored as links, never followed, so nothing outside
    /// the app directory is ever read.
    pub fn scan(source: &Path, exclude: &[String]) -> Result<Manifest, ArchiveError> {
        let mut overrides = OverrideBuilder::new(source);
        for pattern in exclude {
            overrides
                .add(&format!("!{pattern}"))
                .map_err(|error| ArchiveError::Pattern {
                    pattern: pattern.clone(),
                    message: error.to_string(),
                })?;
        }
        let overrides = overrides.build().map_err(|error| ArchiveError::Pattern {
            pattern: exclude.join(", "),
            message: error.to_string(),
        })?;

        let walker = WalkBuilder::new(source)
            .hidden(false)
            .parents(false)
            .ignore(false)
            .git_global(false)
            .git_exclude(false)
            .git_ignore(true)
            .require_git(false)
            .follow_links(false)
            .add_custom_ignore_filename(".crucibleignore")
            .overrides(overrides)
            .filter_entry(|entry| entry.file_name() != ".git")
            .build();

        let mut found = Vec::new();
        for item in walker {
            let item = item.map_err(|error| ArchiveError::Walk {
                path: source.to_path_buf(),
                message: error.to_string(),
            })?;
            if item.depth() == 0 {
                continue;
            }
            let relative = relative_path(source, item.path())?;
            if relative == MANIFEST_NAME {
                continue;
            }
            found.push((item.into_path(), relative));
        }
        let mut entries = read_entries(found)?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));

        let sha256 = hex::encode(Sha256::digest(render_entries(&entries).as_bytes()));
        Ok(Manifest {
            source: source.to_path_buf(),
            entries,
            sha256,
        })
    }

    /// Returns the artifact sha256 shortened to 8 hex digits, as it appears in release ids.
    pub fn short_sha(&self) -> &str {
        &self.sha256[..8]
    }

    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|entry| matches!(entry.kind, EntryKind::File { .. }))
            .count()
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|entry| match entry.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// Renders the manifest file as stored in each release: a header with the artifact sha256,
    /// then one tab-separated line per entry.
    pub fn to_text(&self) -> String {
        format!(
            "{MANIFEST_HEADER} {}\n{}",
            self.sha256,
            render_entries(&self.entries)
        )
    }

    /// Writes the archive of this tree to `out` as an uncompressed tar stream.
    ///
    /// With `only`, file contents are sent only for those paths. Every directory and symlink is
    /// still sent, so the receiving side can build the rest from an earlier release. The manifest
    /// comes last, so a release directory that has it is complete.
    pub fn write_tar<W: Write>(&self, out: W, only: Option<&HashSet<String>>) -> io::Result<W> {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        builder.follow_symlinks(false);
        for entry in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(entry.mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(FIXED_MTIME);
            match &entry.kind {
                EntryKind::Directory => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    builder.append_data(&mut header, &entry.path, io::empty())?;
                }
                EntryKind::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    builder.append_link(&mut header, &entry.path, target)?;
                }
                EntryKind::File { size, .. } => {
                    if only.is_some_and(|paths| !paths.contains(&entry.path)) {
                        continue;
                    }
                    let file = File::open(self.source.join(&entry.path))?;
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(*size);
                    // A file that changed size since the scan must not produce a corrupt archive.
                    builder.append_data(&mut header, &entry.path, file.take(*size))?;
                }
            }
        }
        let text = self.to_text();
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(FIXED_MTIME);
        header.set_size(text.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, MANIFEST_NAME, text.as_bytes())?;
        builder.into_inner()
    }
}

/// A file of the live release that a new release can take as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReusedFile {
    pub path: String,
    pub size: u64,
    pub mode: u32,
}

/// The split of a push's files into those sent and those reused from the live release.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub send: HashSet<String>,
    pub reuse: Vec<ReusedFile>,
}

impl Delta {
    pub fn bytes_to_send(&self, manifest: &Manifest) -> u64 {
        manifest
            .entries
            .iter()
            .filter(|entry| self.send.contains(&entry.path))
            .map(|entry| match entry.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }
}

impl Manifest {
    /// Splits the files into those to send and those the live release already has with the same
    /// content and mode. `live` is the live release's manifest file; `None` when it does not parse.
    pub fn delta(&self, live: &str) -> Option<Delta> {
        manifest_sha256(live)?;
        let mut live_files = std::collections::HashMap::new();
        for line in live.lines().skip(1) {
            let fields: Vec<&str> = line.splitn(5, '\t').collect();
            if let [kind, mode, size, sha256, path] = fields[..] {
                if kind == "f" {
                    live_files.insert(path, (mode, size, sha256));
                }
            } else {
                return None;
            }
        }
        let mut delta = Delta::default();
        for entry in &self.entries {
            let EntryKind::File { size, sha256 } = &entry.kind else {
                continue;
            };
            let mode = format!("{:o}", entry.mode);
            let size_text = size.to_string();
            let is_same = live_files.get(entry.path.as_str()).is_some_and(
                |(live_mode, live_size, live_sha)| {
                    *live_mode == mode && *live_size == size_text && *live_sha == sha256
                },
            );
            if is_same {
                delta.reuse.push(ReusedFile {
                    path: entry.path.clone(),
                    size: *size,
                    mode: entry.mode,
                });
            } else {
                delta.send.insert(entry.path.clone());
            }
        }
        Some(delta)
    }
}

/// Parses the artifact sha256 from a manifest file's first line.
pub fn manifest_sha256(text: &str) -> Option<&str> {
    let sha = text.lines().next()?.strip_prefix(MANIFEST_HEADER)?.trim();
    (sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit())).then_some(sha)
}

fn render_entries(entries: &[Entry]) -> String {
    let mut text = String::new();
    for entry in entries {
        let (kind, size, detail) = match &entry.kind {
            EntryKind::Directory => ("d", 0, "-"),
            EntryKind::File { size, sha256 } => ("f", *size, sha256.as_str()),
            EntryKind::Symlink { target } => ("l", 0, target.as_str()),
        };
        let _ = writeln!(
            text,
            "{kind}\t{:o}\t{size}\t{detail}\t{}",
            entry.mode, entry.path
        );
    }
    text
}

fn relative_path(source: &Path, path: &Path) -> Result<String, ArchiveError> {
    let relative = path.strip_prefix(source).unwrap_or(path);
    let text = relative
        .to_str()
        .ok_or_else(|| ArchiveError::Name {
            path: relative.display().to_string(),
        })?
        .to_string();
    if text.contains(['\t', '\n', '\r']) {
        return Err(ArchiveError::Name { path: text });
    }
    Ok(text)
}

/// Reads and hashes the entries on every core: hashing is most of a scan's time, and a push of a
/// one-line change waits for the scan of the whole tree.
fn read_entries(found: Vec<(PathBuf, String)>) -> Result<Vec<Entry>, ArchiveError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |count| count.get())
        .min(found.len())
        .max(1);
    // Threads take the next unread entry, so a few large files do not leave one thread behind.
    let next = AtomicUsize::new(0);
    let found = &found;
    let results: Vec<Vec<(usize, Result<Entry, ArchiveError>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut buffer = vec![0; HASH_BUFFER_SIZE];
                    let mut read = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some((path, relative)) = found.get(index) else {
                            break;
                        };
                        read.push((index, read_entry(path, relative.clone(), &mut buffer)));
                    }
                    read
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a scan thread panicked"))
            .collect()
    });

    // The first failure in walk order is reported, whichever thread met it first.
    let mut results: Vec<_> = results.into_iter().flatten().collect();
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, entry)| entry).collect()
}

fn read_entry(path: &Path, relative: String, buffer: &mut [u8]) -> Result<Entry, ArchiveError> {
    let read_error = |source| ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::symlink_metadata(path).map_err(read_error)?;
    let mode = metadata.permissions().mode() & 0o7777;
    let kind = if metadata.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(read_error)?;
        EntryKind::Symlink {
            target: target.to_string_lossy().into_owned(),
        }
    } else if metadata.is_dir() {
        EntryKind::Directory
    } else {
        let (size, sha256) = hash_file(path, buffer).map_err(read_error)?;
        EntryKind::File { size, sha256 }
    };
    Ok(Entry {
        path: relative,
        mode,
        kind,
    })
}

/// Hashes one file through `buffer`, which the caller reuses: zeroing a new 256 KiB buffer for
/// each file took about as long as hashing a tree of small files.
fn hash_file(path: &Path, buffer: &mut [u8]) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut size = 0;
    loop {
        let read = file.read(buffer)?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("pkg/tests")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref").unwrap();
        std::fs::write(root.join("app.py"), "print('hi')\n").unwrap();
        std::fs::write(root.join("pkg/mod.py"), "x = 1\n").unwrap();
        std::fs::write(root.join("pkg/mod.pyc"), "bytecode").unwrap();
        std::fs::write(root.join("pkg/tests/test_mod.py"), "").unwrap();
        std::fs::write(root.join("secret.log"), "x").unwrap();
        std::fs::write(root.join("notes.tmp"), "x").unwrap();
        std::fs::write(root.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(root.join(".crucibleignore"), "*.tmp\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("outside")).unwrap();
        std::fs::set_permissions(root.join("app.py"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        dir
    }

    fn paths(manifest: &Manifest) -> Vec<&str> {
        manifest
            .entries
            .iter()
            .map(|entry| entry.path.as_str())
            .collect()
    }

    fn excludes() -> Vec<String> {
        vec!["*.pyc".into(), "tests/".into()]
    }

    #[test]
    fn scan_honours_ignore_files_and_excludes() {
        let dir = tree();
        let manifest = Manifest::scan(dir.path(), &excludes()).unwrap();
        assert_eq!(
            paths(&manifest),
            vec![
                ".crucibleignore",
                ".gitignore",
                "app.py",
                "outside",
                "pkg",
                "pkg/mod.py"
            ]
        );
    }

    #[test]
    fn symlink_is_stored_not_followed() {
        let dir = tree();
        let manifest = Manifest::scan(dir.path(), &[]).unwrap();
        let link = manifest
            .entries
            .iter()
            .find(|entry| entry.path == "outside")
            .unwrap();
        assert_eq!(
            link.kind,
            EntryKind::Symlink {
                target: "/etc/passwd".into()
            }
        );
    }

    #[test]
    fn same_tree_gives_same_archive() {
        let dir = tree();
        let first = Manifest::scan(dir.path(), &excludes()).unwrap();
        let bytes_first = first.write_tar(Vec::new(), None).unwrap();
        // Touching a file changes its mtime but not the archive.
        std::fs::write(dir.path().join("pkg/mod.py"), "x = 1\n").unwrap();
        let second = Manifest::scan(dir.path(), &excludes()).unwrap();
        let bytes_second = second.write_tar(Vec::new(), None).unwrap();
        assert_eq!(first.sha256, second.sha256);
        assert_eq!(bytes_first, bytes_second);
    }

    #[test]
    fn content_change_changes_sha() {
        let dir = tree();
        let first = Manifest::scan(dir.path(), &excludes()).unwrap();
        std::fs::write(dir.path().join("pkg/mod.py"), "x = 2\n").unwrap();
        let second = Manifest::scan(dir.path(), &excludes()).unwrap();
        assert_ne!(first.sha256, second.sha256);
    }

    #[test]
    fn mode_change_changes_sha() {
        let dir = tree();
        let first = Manifest::scan(dir.path(), &excludes()).unwrap();
        std::fs::set_permissions(
            dir.path().join("pkg/mod.py"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let second = Manifest::scan(dir.path(), &excludes()).unwrap();
        assert_ne!(first.sha256, second.sha256);
    }

    #[test]
    fn archive_keeps_modes_and_normalises_owner() {
        let dir = tree();
        let manifest = Manifest::scan(dir.path(), &excludes()).unwrap();
        let bytes = manifest.write_tar(Vec::new(), None).unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.uid().unwrap(), 0);
            assert_eq!(header.mtime().unwrap(), FIXED_MTIME);
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            if name == "app.py" {
                assert_eq!(header.mode().unwrap(), 0o755);
            }
            names.push(name);
        }
        assert_eq!(names.last().map(String::as_str), Some(MANIFEST_NAME));
    }

    #[test]
    fn partial_archive_sends_only_listed_files() {
        let dir = tree();
        let manifest = Manifest::scan(dir.path(), &excludes()).unwrap();
        let only: HashSet<String> = ["pkg/mod.py".to_string()].into();
        let bytes = manifest.write_tar(Vec::new(), Some(&only)).unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|entry| {
                entry
                    .unwrap()
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert!(names.contains(&"pkg/mod.py".to_string()));
        assert!(!names.contains(&"app.py".to_string()));
        assert!(names.contains(&"pkg".to_string()));
    }

    #[test]
    fn manifest_header_round_trips() {
        let dir = tree();
        let manifest = Manifest::scan(dir.path(), &[]).unwrap();
        assert_eq!(
            manifest_sha256(&manifest.to_text()),
            Some(manifest.sha256.as_str())
        );
        assert_eq!(manifest_sha256("garbage"), None);
    }

    #[test]
    fn delta_sends_only_changed_files() {
        let dir = tree();
        let live = Manifest::scan(dir.path(), &excludes()).unwrap();
        std::fs::write(dir.path().join("pkg/mod.py"), "x = 2\n").unwrap();
        std::fs::write(dir.path().join("new.py"), "y = 1\n").unwrap();
        let next = Manifest::scan(dir.path(), &excludes()).unwrap();
        let delta = next.delta(&live.to_text()).unwrap();
        let expected: HashSet<String> = ["pkg/mod.py".to_string(), "new.py".to_string()].into();
        assert_eq!(delta.send, expected);
        let reused: Vec<&str> = delta.reuse.iter().map(|file| file.path.as_str()).collect();
        assert_eq!(reused, vec![".crucibleignore", ".gitignore", "app.py"]);
    }

    #[test]
    fn delta_resends_file_whose_mode_changed() {
        let dir = tree();
        let live = Manifest::scan(dir.path(), &excludes()).unwrap();
        std::fs::set_permissions(
            dir.path().join("app.py"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let next = Manifest::scan(dir.path(), &excludes()).unwrap();
        let delta = next.delta(&live.to_text()).unwrap();
        assert!(delta.send.contains("app.py"));
    }

    #[test]
    fn delta_rejects_unreadable_manifest() {
        let dir = tree();
        let next = Manifest::scan(dir.path(), &excludes()).unwrap();
        assert_eq!(next.delta("not a manifest"), None);
        let broken = format!("{}\nf\t644\n", live_header());
        assert_eq!(next.delta(&broken), None);
    }

    fn live_header() -> String {
        format!("{MANIFEST_HEADER} {}", "a".repeat(64))
    }

    #[test]
    fn gzip_stream_unpacks() {
        let dir = tree();
        let manifest = Manifest::scan(dir.path(), &excludes()).unwrap();
        let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let compressed = manifest.write_tar(encoder, None).unwrap().finish().unwrap();
        let mut archive = tar::Archive::new(GzDecoder::new(compressed.as_slice()));
        let target = tempfile::tempdir().unwrap();
        archive.unpack(target.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(target.path().join("app.py")).unwrap(),
            "print('hi')\n"
        );
    }
}
