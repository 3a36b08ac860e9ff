"""The invoke task modules (the tasks layer): thin wrappers over nflab/, vm/, kmods/."""
