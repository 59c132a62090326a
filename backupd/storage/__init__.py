"""Where a repository's bytes live: a local folder or a bucket of an S3-compatible store,
behind one repository interface.

The layout is the same everywhere (``<vm>/<backup-id>/{manifest.json,<disk>.qcow2}``,
the manifest written last), so a downloaded prefix is a valid local repository.

Modules: :mod:`.location` (``s3://BUCKET/PREFIX`` or a path), :mod:`.vmrepo` (what every
repository of a VM answers, whatever holds it: the chain walk, latest, resolve, new ids),
:mod:`.images` (a stored image as the gate reads it and as qemu opens it),
:mod:`.bridge` (the S3 client on a loop of its own, callable from sync and async code),
:mod:`.s3repo` (the S3 repository), :mod:`.s3stage` (a backup being uploaded),
:mod:`.s3image` (an object pinned to one version, its checked metadata kept),
:mod:`.objectnbd` (the NBD server that hands such objects to qemu), :mod:`.leases`
(runs in progress and what a killed one left), :mod:`.locks` (host-local locks of S3
repositories), :mod:`.repositories` (a configuration's repository, opened once).

This package's ``__init__`` imports nothing, so the repository side stays free of the
configuration parser.
"""
