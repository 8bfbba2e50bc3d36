"""The baseline policies (resident, static, static-prefetch, LRU, LFU) and Belady's oracle: one interface, each a
small class; the scored controller is in `controller/`."""
