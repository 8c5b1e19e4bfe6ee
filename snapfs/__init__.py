"""snapfs: a VM's disks as sparse files."""
