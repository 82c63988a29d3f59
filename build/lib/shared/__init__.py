"""Models, settings and plumbing shared by Zaki's provisioner, monitor and gateway proxy."""
