"""Where disks come from: an image directory, libvirt domains, libvirt backup jobs.

- ``imagedir``: leaf images under a directory and their views (pure);
- ``bitmaps``: which copies of a dirty bitmap to trust (pure);
- ``libvirt_xml``: what libvirt's XML says (pure);
- ``libvirt``: domains, snapshots, checkpoints (the libvirt connection);
- ``backup``: pull-mode backup jobs of running domains.
"""
