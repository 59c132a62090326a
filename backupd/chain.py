"""The gate between the repository and qemu: the files of one disk's backing chain,
each proven to be an image backupd could have written before anything opens it.

qemu (run as root by ``serve``, ``restore`` and ``verify``) believes what an image's
header says: a crafted header can make it open any host file as an external data file,
or follow a backing path out of the repository.  So every repository image goes through
:func:`checked_chain` first, and nothing hands qemu a repository file any other way:

- the chain comes from the manifests (:meth:`VMRepository.chain`: it always ends);
- the file of disk D of backup B is exactly ``<vm>/<B>/<D>.qcow2``, opened without
  following a symlink at any level (:meth:`VMRepository.open_file`), or the object of
  that key pinned to the version read (:class:`backupd.storage.s3image.ObjectImage`);
- :func:`backupd.qcow2.inspector.inspect_image` accepts its header and tables;
- its backing file name is exactly ``../<parent>/<D>.qcow2`` (none for a full), and its
  virtual and cluster sizes are the ones its manifest records.

The checked images stay open while the caller needs them, so a caller can hand qemu
the very files that were checked (``/dev/fd/N``, or the pinned object with the checked
metadata: :meth:`~backupd.storage.images.ImageFile.qemu_file`) instead of names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath

from backupd.errors import ChainError, NotFoundError, RepositoryError
from backupd.manifest import Manifest
from backupd.qcow2.inspector import ImageFacts, ImageRefused, inspect_image
from backupd.storage.images import ImageFile
from backupd.storage.vmrepo import VMRepo

#: encrypted files are admitted only for VMs configured with encryption (callers say so)
ALLOW_ENCRYPTION = False


@dataclass(frozen=True, slots=True)
class CheckedFile:
    """One file of a chain, open as ``image`` (what the checks read through; ``fd`` is
    its descriptor when it is a local file, else -1)."""

    backup: str
    path: PurePath
    fd: int
    facts: ImageFacts
    image: ImageFile


def image_name(disk: str) -> str:
    return f"{disk}.qcow2"


def check_image(
    repo: VMRepo,
    manifest: Manifest,
    disk: str,
    parent: Manifest | None,
    *,
    allow_encryption: bool = ALLOW_ENCRYPTION,
) -> CheckedFile:
    """Open and check the file of ``disk`` in ``manifest``'s backup, whose parent in the
    chain is ``parent`` (ChainError saying why it is refused).  The caller closes
    ``image``."""
    if disk not in manifest.disks:
        raise NotFoundError(f"backup {manifest.id} of vm {repo.vm} has no disk {disk!r}")
    where = f"backup {manifest.id} of vm {repo.vm}, disk {disk}"
    try:
        image = repo.image(manifest.id, image_name(disk))
    except FileNotFoundError:
        raise ChainError(f"{where}: file {image_name(disk)} is missing") from None
    except RepositoryError as exc:  # a symlink or a special file in its place
        raise ChainError(str(exc)) from None
    return check_open_image(image, manifest, disk, parent, allow_encryption=allow_encryption)


def check_open_image(
    image: ImageFile,
    manifest: Manifest,
    disk: str,
    parent: Manifest | None,
    *,
    allow_encryption: bool = ALLOW_ENCRYPTION,
) -> CheckedFile:
    """The gate's checks of an image already open (e.g. a copy that just arrived, before
    its manifest exists): closed again and ChainError when it is refused."""
    where = f"backup {manifest.id} of vm {manifest.vm}, disk {disk}"
    try:
        facts = inspect_image(image.inspectable, allow_encryption=allow_encryption)
        record = manifest.disks[disk]
        expected = None if parent is None else f"../{parent.id}/{image_name(disk)}"
        if facts.backing_file != expected:
            raise ImageRefused(f"backing file {facts.backing_file!r} is not {expected!r}")
        if facts.encrypted != record.encrypted:
            said = "encrypted" if record.encrypted else "not encrypted"
            raise ImageRefused(f"the manifest says {said}, the file is not so")
        if (facts.virtual_size, facts.cluster_size) != (record.virtual_size, record.cluster_size):
            raise ImageRefused(
                f"{facts.virtual_size} bytes in {facts.cluster_size}-byte clusters, but the "
                f"manifest says {record.virtual_size} in {record.cluster_size}"
            )
    except ImageRefused as exc:
        image.close()
        raise ChainError(f"{where}: {exc}; refusing to open it") from None
    except BaseException:
        image.close()
        raise
    return CheckedFile(manifest.id, image.path, image.fd, facts, image)


@contextlib.contextmanager
def checked_chain(
    repo: VMRepo, backup: Manifest, disk: str, *, encrypted: bool = ALLOW_ENCRYPTION
) -> Iterator[list[CheckedFile]]:
    """Every file of ``disk`` from the full to ``backup``, checked and held open until
    the block ends (ChainError for the first one refused).  ``encrypted``: the VM is
    configured with encryption, so encrypted files are admitted."""
    files: list[CheckedFile] = []
    try:
        previous: Manifest | None = None
        for manifest in repo.chain(backup.id):
            files.append(check_image(repo, manifest, disk, previous, allow_encryption=encrypted))
            previous = manifest
        yield files
    finally:
        for checked in files:
            checked.image.close()


def chain_files(
    repo: VMRepo, backup: Manifest, disk: str, *, encrypted: bool = ALLOW_ENCRYPTION
) -> list[PurePath]:
    """The paths of ``disk``'s chain from the full to ``backup``, every file checked."""
    with checked_chain(repo, backup, disk, encrypted=encrypted) as files:
        return [checked.path for checked in files]
