//! colo-xen: colo's backend on a real Xen domain through libxenctrl and libxenforeignmemory.
