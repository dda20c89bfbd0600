//! A disk that loses, at a power cut, every byte not yet synced.
//!
//! [`LossyDisk`] mounts a FUSE file system over a backing directory. Every
//! write and truncation is applied to the backing file at once, and the bytes it
//! replaced are kept in an undo log of that file; `fsync` or `fdatasync` of the
//! file empties its log. [`LossyDisk::power_cut`] then, in one step under the
//! file system's lock, rolls every file back to its last sync and fails every
//! later operation with `EIO`: the disk as a machine finds it after the power
//! went, while the process that wrote it may still be running.
//!
//! The model is the one POSIX promises and no more: file contents survive only
//! what was synced. It is harsher than ext4 in its default mode, which also
//! writes back on its own. Optionally the earliest unsynced write of each file
//! survives in part (its first half), as a disk may persist some sectors of a
//! write and not others: a torn tail.
//!
//! Names are lost too. Each name change (create, mkdir, symlink, unlink,
//! rmdir, rename) goes into a log, and the cut undoes, newest first,
//! every change not made durable since: a new name goes, a removed one comes
//! back with what it named (kept aside until then), a rename moves back over
//! what it replaced. A change is durable once each directory it touched is
//! synced (`fsync` of the directory), and, as ext4 does (`ext4_sync_parent`),
//! a new name is also durable once the file or directory it names is synced,
//! with every new directory above it. That is what ext4 without a journal (the
//! root file system of this project's machines) keeps; ext4 with a journal
//! keeps more, as its commits carry every earlier name change.
//!
//! The kernel caches nothing the file system could later contradict: no
//! writeback cache, and attributes and entries live for zero seconds. Locks are
//! the kernel's own (the file system does not ask for `FUSE_POSIX_LOCKS`),
//! which SQLite's WAL mode needs.

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::ZERO;

/// What one write or truncation replaced: enough to undo it.
struct Undo {
    /// Where the change began.
    offset: u64,
    /// How many bytes it wrote from `offset` (0 for a truncation).
    written: u64,
    /// The bytes it overwrote, from `offset` up to the old end at most.
    old: Vec<u8>,
    /// The file's length before it.
    old_len: u64,
}

/// What a power cut took from one file.
#[derive(Debug)]
pub struct Lost {
    /// The file's path under the disk's root.
    pub path: PathBuf,
    /// Writes and truncations undone (a torn one counts).
    pub changes: usize,
    /// The file's length before the cut and after it.
    pub len: (u64, u64),
}

/// What a power cut took: file contents, then names.
#[derive(Debug)]
pub struct Cut {
    pub files: Vec<Lost>,
    /// The name changes undone, newest first, as `created a`, `removed a`,
    /// `renamed a to b`.
    pub names: Vec<String>,
}

impl Cut {
    /// Whether the cut undid unsynced writes to a file that `pick` chooses.
    pub fn undid(&self, pick: impl Fn(&Path) -> bool) -> bool {
        self.files.iter().any(|l| pick(&l.path))
    }
}

/// How to undo one name change.
#[derive(Debug)]
enum NameUndo {
    /// A new name (file, directory, symlink) for the inode `ino` in the
    /// directory `parent`: removed again, with whatever is under it.
    Created { rel: PathBuf, ino: u64, parent: u64 },
    /// A removed name: what it named waits in the grave, and comes back.
    Removed { rel: PathBuf, grave: PathBuf },
    /// A rename: moved back, and what it replaced comes back from the grave.
    Renamed {
        from: PathBuf,
        to: PathBuf,
        replaced: Option<PathBuf>,
    },
}

/// A name change not yet durable.
#[derive(Debug)]
struct NameChange {
    /// The directories (inodes) still to be synced for it to be durable.
    dirs: Vec<u64>,
    undo: NameUndo,
}

impl NameChange {
    /// The files it keeps aside, no longer needed once it is durable.
    fn grave(&self) -> Option<&Path> {
        match &self.undo {
            NameUndo::Removed { grave, .. } => Some(grave),
            NameUndo::Renamed { replaced, .. } => replaced.as_deref(),
            NameUndo::Created { .. } => None,
        }
    }

    fn describe(&self) -> String {
        match &self.undo {
            NameUndo::Created { rel, .. } => format!("created {}", rel.display()),
            NameUndo::Removed { rel, .. } => format!("removed {}", rel.display()),
            NameUndo::Renamed { from, to, .. } => {
                format!("renamed {} to {}", from.display(), to.display())
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// Inode number → path under the backing root ("" is the root).
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, (u64, File)>,
    next_fh: u64,
    /// Unsynced changes by inode, oldest first.
    undo: HashMap<u64, Vec<Undo>>,
    /// Name changes not yet durable, oldest first.
    names: Vec<NameChange>,
    /// Where removed and replaced files wait (outside the disk's root, on the
    /// same file system as the backing directory), and the next number there.
    grave: PathBuf,
    next_grave: u64,
    /// Set by the power cut: every operation fails from then on.
    dead: bool,
}

impl State {
    fn unsynced(&self) -> Vec<PathBuf> {
        self.undo
            .iter()
            .filter(|(_, u)| !u.is_empty())
            .filter_map(|(ino, _)| self.paths.get(ino).cloned())
            .collect()
    }

    /// `dir` was synced: every change it touched is durable as far as it
    /// goes; those durable now are dropped, with what they kept aside.
    fn dir_synced(&mut self, dir: u64) {
        for c in &mut self.names {
            c.dirs.retain(|d| *d != dir);
        }
        let (pending, durable): (Vec<_>, Vec<_>) = std::mem::take(&mut self.names)
            .into_iter()
            .partition(|c| !c.dirs.is_empty());
        self.names = pending;
        for grave in durable.iter().filter_map(NameChange::grave) {
            let _ = remove_any(grave);
        }
    }

    /// `ino` was synced: as in ext4, a name still new becomes durable with
    /// it, and so does each new directory above it.
    fn entry_synced(&mut self, ino: u64) {
        let mut ino = ino;
        loop {
            let new = self.names.iter().position(
                |c| matches!(c.undo, NameUndo::Created { ino: created, .. } if created == ino),
            );
            let Some(i) = new else {
                return;
            };
            let NameUndo::Created { parent, .. } = self.names.remove(i).undo else {
                unreachable!()
            };
            ino = parent;
        }
    }

    /// Move `rel` (under `root`) into the grave, keeping the inodes of
    /// everything under it: their unsynced bytes are undone there, and the
    /// name may come back.
    fn bury(&mut self, root: &Path, rel: &Path) -> std::io::Result<PathBuf> {
        let grave = self.grave.join(self.next_grave.to_string());
        self.next_grave += 1;
        std::fs::rename(root.join(rel), &grave)?;
        self.move_inodes(rel, &grave);
        Ok(grave)
    }

    /// The inodes at `from` and below now live at `to`.
    fn move_inodes(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> = self
            .inodes
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, ino)| (p.clone(), *ino))
            .collect();
        for (old, ino) in moved {
            let below = old.strip_prefix(from).unwrap();
            let new = match below.as_os_str().is_empty() {
                true => to.to_owned(),
                false => to.join(below),
            };
            self.inodes.remove(&old);
            self.inodes.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
    }
}

/// Remove a file, symlink or directory tree; absent is fine.
fn remove_any(path: &Path) -> std::io::Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether the directory at `path` holds nothing (rmdir, or a rename over it,
/// may go ahead).
fn empty_dir(path: &Path) -> Result<bool, Errno> {
    Ok(std::fs::read_dir(path).map_err(errno)?.next().is_none())
}

/// Rename, where an absent source means a later change already took it.
fn move_back(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

struct LossyFs {
    root: PathBuf,
    state: Arc<Mutex<State>>,
}

/// A mounted [`LossyFs`]: files under [`LossyDisk::path`] land in
/// [`LossyDisk::backing`].
pub struct LossyDisk {
    mnt: tempfile::TempDir,
    back: tempfile::TempDir,
    /// Where removed and replaced names wait until they are durable.
    _grave: tempfile::TempDir,
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
}

impl LossyDisk {
    /// Mount a fresh, empty disk, as root (CI runs as root); `None`, said
    /// loudly, for another user. Panics, naming the cause, when root cannot
    /// mount it (no `/dev/fuse`).
    pub fn mount() -> Option<LossyDisk> {
        LossyDisk::mount_over(tempfile::tempdir().unwrap())
    }

    /// The same over a backing directory already filled: what is in it is on
    /// the disk, synced. Every user may use the disk; a name someone makes
    /// belongs to them (so that a server running as another user finds its
    /// files its own).
    pub fn mount_over(back: tempfile::TempDir) -> Option<LossyDisk> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("NOT run: mounting the FUSE power-cut disk needs root (CI runs as root)");
            return None;
        }
        let mnt = tempfile::tempdir().unwrap();
        // Beside the backing directory, so that a rename gets there.
        let grave = tempfile::tempdir_in(back.path().parent().unwrap()).unwrap();
        let mut state = State {
            next_ino: 2,
            next_fh: 1,
            grave: grave.path().to_owned(),
            ..State::default()
        };
        state.paths.insert(INodeNo::ROOT.0, PathBuf::new());
        state.inodes.insert(PathBuf::new(), INodeNo::ROOT.0);
        let state = Arc::new(Mutex::new(state));
        let fs = LossyFs {
            root: back.path().to_owned(),
            state: state.clone(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("lossyfs".into())];
        config.acl = fuser::SessionACL::All;
        let session = fuser::spawn_mount(fs, mnt.path(), &config)
            .unwrap_or_else(|e| panic!("cannot mount the FUSE power-cut disk: {e}"));
        Some(LossyDisk {
            mnt,
            back,
            _grave: grave,
            state,
            session: Some(session),
        })
    }

    /// Where the gate's files go.
    pub fn path(&self) -> &Path {
        self.mnt.path()
    }

    /// The same files, as they are on the disk: after [`LossyDisk::power_cut`],
    /// what a machine finds when the power is back.
    pub fn backing(&self) -> &Path {
        self.back.path()
    }

    /// Paths with unsynced changes now, under the disk's root.
    pub fn unsynced(&self) -> Vec<PathBuf> {
        lock(&self.state).unsynced()
    }

    /// Name changes not durable now, oldest first (as [`Cut::names`] words
    /// them).
    pub fn unsynced_names(&self) -> Vec<String> {
        lock(&self.state)
            .names
            .iter()
            .map(NameChange::describe)
            .collect()
    }

    /// Cut the power now if `when` holds for the paths with unsynced changes
    /// (checked under the same lock, so nothing is written in between).
    /// Returns what was lost, or `None` (and nothing happens) when `when` is
    /// false. `tear` keeps the first half of each file's oldest unsynced write.
    /// File contents are rolled back first, then names.
    pub fn power_cut_if(&self, tear: bool, when: impl FnOnce(&[PathBuf]) -> bool) -> Option<Cut> {
        let mut s = lock(&self.state);
        assert!(!s.dead, "the power is already off");
        if !when(&s.unsynced()) {
            return None;
        }
        s.dead = true;
        s.handles.clear();
        let mut lost = Vec::new();
        for (ino, mut changes) in std::mem::take(&mut s.undo) {
            let Some(rel) = s.paths.get(&ino) else {
                continue;
            };
            if changes.is_empty() {
                continue;
            }
            let path = self.back.path().join(rel);
            let file = match OpenOptions::new().write(true).open(&path) {
                Ok(file) => file,
                // Unlinked since: nothing left to lose.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("cannot roll back {}: {e}", path.display()),
            };
            let before = file.metadata().unwrap().len();
            let n = changes.len();
            let oldest = changes.remove(0);
            for u in changes.iter().rev() {
                undo(&file, u, 0);
            }
            let keep = if tear { oldest.written / 2 } else { 0 };
            undo(&file, &oldest, keep);
            let after = file.metadata().unwrap().len();
            lost.push(Lost {
                path: rel.clone(),
                changes: n,
                len: (before, after),
            });
        }
        let root = self.back.path();
        let mut names = Vec::new();
        for change in std::mem::take(&mut s.names).into_iter().rev() {
            names.push(change.describe());
            let undone = match change.undo {
                NameUndo::Created { rel, .. } => remove_any(&root.join(rel)),
                NameUndo::Removed { rel, grave } => move_back(&grave, &root.join(rel)),
                NameUndo::Renamed { from, to, replaced } => {
                    move_back(&root.join(&to), &root.join(from)).and_then(|()| match replaced {
                        Some(grave) => move_back(&grave, &root.join(to)),
                        None => Ok(()),
                    })
                }
            };
            if let Err(e) = undone {
                panic!("cannot undo {}: {e}", names.last().unwrap());
            }
        }
        Some(Cut { files: lost, names })
    }

    /// Unmount (the writer must be gone, or the mount is busy).
    pub fn unmount(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                // Not left mounted after the test, whatever it failed on.
                self.detach();
                panic!("unmount the FUSE disk: {e}");
            }
        }
    }

    /// Unmount lazily: the mount goes once nothing has a file open in it.
    fn detach(&self) {
        let path = std::ffi::CString::new(self.mnt.path().as_os_str().as_encoded_bytes()).unwrap();
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

impl Drop for LossyDisk {
    fn drop(&mut self) {
        if self.session.is_some() {
            // Lazily: a panicking test may leave a process with files open.
            self.detach();
            drop(self.session.take());
        }
    }
}

/// Undo `u` on `file`, except its first `keep` written bytes.
fn undo(file: &File, u: &Undo, keep: u64) {
    let keep = keep.min(u.written);
    let restored = u.old.len() as u64;
    if keep < restored {
        file.write_all_at(&u.old[keep as usize..], u.offset + keep)
            .unwrap();
    }
    let len = if u.written == 0 {
        u.old_len
    } else {
        u.old_len.max(u.offset + keep)
    };
    file.set_len(len).unwrap();
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Record what writing `len` bytes at `offset` (or, with `len` 0, cutting the
/// file to `offset`) is about to replace.
fn before_change(file: &File, offset: u64, len: u64) -> std::io::Result<Undo> {
    let old_len = file.metadata()?.len();
    let end = if len == 0 { old_len } else { offset + len };
    let mut old = vec![0; end.min(old_len).saturating_sub(offset) as usize];
    file.read_exact_at(&mut old, offset)?;
    Ok(Undo {
        offset,
        written: len,
        old,
        old_len,
    })
}

impl LossyFs {
    /// The state, or `EIO` once the power is off.
    fn live(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let s = lock(&self.state);
        if s.dead {
            return Err(Errno::EIO);
        }
        Ok(s)
    }

    fn path_of(&self, s: &State, ino: INodeNo) -> Result<PathBuf, Errno> {
        s.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, s: &State, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path_of(s, parent)?.join(name))
    }

    /// The attributes of `rel`, giving it an inode number if it has none.
    fn attr(&self, s: &mut State, rel: &Path) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.root.join(rel)).map_err(errno)?;
        let ino = match s.inodes.get(rel) {
            Some(ino) => *ino,
            None => {
                let ino = s.next_ino;
                s.next_ino += 1;
                s.inodes.insert(rel.to_owned(), ino);
                s.paths.insert(ino, rel.to_owned());
                ino
            }
        };
        let time = |secs: i64, nanos: i64| {
            SystemTime::UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.max(0) as u32)
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: meta.len(),
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: SystemTime::UNIX_EPOCH,
            kind: FileType::from_std(meta.file_type()).ok_or(Errno::EIO)?,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Unlink (`dir` false) or rmdir: the name goes to the grave, from which
    /// a power cut before its directory is synced brings it back.
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let r = self.live().and_then(|mut s| {
            let rel = self.child(&s, parent, name)?;
            let path = self.root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).map_err(errno)?;
            match (dir, meta.is_dir()) {
                (false, true) => return Err(Errno::EISDIR),
                (true, false) => return Err(Errno::ENOTDIR),
                (true, true) if !empty_dir(&path)? => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            let grave = s.bury(&self.root, &rel).map_err(errno)?;
            s.names.push(NameChange {
                dirs: vec![parent.0],
                undo: NameUndo::Removed { rel, grave },
            });
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// The attributes of a name `req`'s user just made in `parent` (now
    /// theirs), logged as a change that a cut undoes until it is durable.
    fn created(
        &self,
        req: &Request,
        s: &mut State,
        parent: INodeNo,
        rel: PathBuf,
    ) -> Result<FileAttr, Errno> {
        std::os::unix::fs::lchown(self.root.join(&rel), Some(req.uid()), Some(req.gid()))
            .map_err(errno)?;
        let attr = self.attr(s, &rel)?;
        s.names.push(NameChange {
            dirs: vec![parent.0],
            undo: NameUndo::Created {
                rel,
                ino: attr.ino.0,
                parent: parent.0,
            },
        });
        Ok(attr)
    }

    fn open_handle(&self, s: &mut State, ino: u64, file: File) -> FileHandle {
        let fh = s.next_fh;
        s.next_fh += 1;
        s.handles.insert(fh, (ino, file));
        FileHandle(fh)
    }

    /// Apply one change to an open file, keeping its undo record.
    fn change(
        &self,
        fh: FileHandle,
        offset: u64,
        len: u64,
        apply: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> Result<(), Errno> {
        let mut s = self.live()?;
        let (ino, file) = s.handles.get(&fh.0).ok_or(Errno::EBADF)?;
        let ino = *ino;
        let u = before_change(file, offset, len).map_err(errno)?;
        apply(file).map_err(errno)?;
        s.undo.entry(ino).or_default().push(u);
        Ok(())
    }
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.live().and_then(|mut s| {
            let rel = self.child(&s, parent, name)?;
            self.attr(&mut s, &rel)
        });
        match r {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.live().and_then(|mut s| {
            let rel = self.path_of(&s, ino)?;
            self.attr(&mut s, &rel)
        });
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.live().and_then(|mut s| {
            let rel = self.path_of(&s, ino)?;
            let path = self.root.join(&rel);
            if let Some(size) = size {
                let by_name;
                let u = {
                    let file = match fh.and_then(|fh| s.handles.get(&fh.0)) {
                        Some((_, file)) => file,
                        None => {
                            by_name = OpenOptions::new()
                                .read(true)
                                .write(true)
                                .open(&path)
                                .map_err(errno)?;
                            &by_name
                        }
                    };
                    let u = before_change(file, size, 0).map_err(errno)?;
                    file.set_len(size).map_err(errno)?;
                    u
                };
                s.undo.entry(ino.0).or_default().push(u);
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            self.attr(&mut s, &rel)
        });
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.live().and_then(|s| {
            let rel = self.path_of(&s, ino)?;
            std::fs::read_link(self.root.join(rel)).map_err(errno)
        });
        match r {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.live().and_then(|mut s| {
            let rel = self.child(&s, parent, name)?;
            let path = self.root.join(&rel);
            std::fs::create_dir(&path).map_err(errno)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !umask))
                .map_err(errno)?;
            self.created(req, &mut s, parent, rel)
        });
        match r {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.live().and_then(|mut s| {
            let rel = self.child(&s, parent, link_name)?;
            std::os::unix::fs::symlink(target, self.root.join(&rel)).map_err(errno)?;
            self.created(req, &mut s, parent, rel)
        });
        match r {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.live().and_then(|mut s| {
            if flags != RenameFlags::empty() {
                return Err(Errno::EINVAL);
            }
            let (from, to) = (
                self.child(&s, parent, name)?,
                self.child(&s, newparent, newname)?,
            );
            let moving = std::fs::symlink_metadata(self.root.join(&from)).map_err(errno)?;
            // What the new name replaces waits in the grave (the two steps
            // are one to the kernel: it sees nothing in between), once it is
            // sure rename(2) would replace it.
            let replaced = match std::fs::symlink_metadata(self.root.join(&to)) {
                Ok(target) => {
                    match (moving.is_dir(), target.is_dir()) {
                        (false, true) => return Err(Errno::EISDIR),
                        (true, false) => return Err(Errno::ENOTDIR),
                        (true, true) if !empty_dir(&self.root.join(&to))? => {
                            return Err(Errno::ENOTEMPTY)
                        }
                        _ => {}
                    }
                    Some(s.bury(&self.root, &to).map_err(errno)?)
                }
                Err(_) => None,
            };
            if let Err(e) = std::fs::rename(self.root.join(&from), self.root.join(&to)) {
                if let Some(grave) = &replaced {
                    let _ = std::fs::rename(grave, self.root.join(&to));
                    s.move_inodes(grave, &to);
                }
                return Err(errno(e));
            }
            s.move_inodes(&from, &to);
            let mut dirs = vec![parent.0];
            if newparent != parent {
                dirs.push(newparent.0);
            }
            s.names.push(NameChange {
                dirs,
                undo: NameUndo::Renamed { from, to, replaced },
            });
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.live().and_then(|mut s| {
            let rel = self.path_of(&s, ino)?;
            // The kernel places appends itself and sends truncations apart.
            let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
            let file = OpenOptions::new()
                .read(true)
                .write(write)
                .open(self.root.join(rel))
                .map_err(errno)?;
            Ok(self.open_handle(&mut s, ino.0, file))
        });
        match r {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.live().and_then(|s| {
            let (_, file) = s.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let mut buf = vec![0; size as usize];
            let mut n = 0;
            while n < buf.len() {
                match file.read_at(&mut buf[n..], offset + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(errno(e)),
                }
            }
            buf.truncate(n);
            Ok(buf)
        });
        match r {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if data.is_empty() {
            return reply.written(0);
        }
        let r = self.change(fh, offset, data.len() as u64, |f| {
            f.write_all_at(data, offset)
        });
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.live() {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.state).handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The backing file outlives the cut as it is: what matters is that the
        // changes so far are no longer undone.
        match self.live() {
            Ok(mut s) => {
                s.undo.remove(&ino.0);
                s.entry_synced(ino.0);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.live().and_then(|mut s| {
            let rel = self.path_of(&s, ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for entry in std::fs::read_dir(self.root.join(&rel)).map_err(errno)? {
                let entry = entry.map_err(errno)?;
                let child = rel.join(entry.file_name());
                let attr = self.attr(&mut s, &child)?;
                entries.push((attr.ino.0, attr.kind, entry.file_name()));
            }
            Ok(entries)
        });
        match r {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.live() {
            Ok(mut s) => {
                s.dir_synced(ino.0);
                s.entry_synced(ino.0);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).unwrap();
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return reply.error(Errno::EIO);
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.live() {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.live().and_then(|mut s| {
            let rel = self.child(&s, parent, name)?;
            let path = self.root.join(&rel);
            let new = std::fs::symlink_metadata(&path).is_err();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                // The kernel creates only names it has found absent.
                .truncate(false)
                .create_new(flags & libc::O_EXCL != 0)
                .open(&path)
                .map_err(errno)?;
            file.set_permissions(std::fs::Permissions::from_mode(mode & !umask & 0o7777))
                .map_err(errno)?;
            let attr = match new {
                true => self.created(req, &mut s, parent, rel)?,
                false => self.attr(&mut s, &rel)?,
            };
            let fh = self.open_handle(&mut s, attr.ino.0, file);
            Ok((attr, fh))
        });
        match r {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }
}
