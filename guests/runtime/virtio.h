/* A small virtio 1.x driver for tiny guests: virtio-pci (modern) discovery, feature
 * negotiation, split virtqueues, polled completion. Runs at CPL3. */
#ifndef PYVMM_VIRTIO_H
#define PYVMM_VIRTIO_H
#include "pci.h"

#define VIRTIO_F_VERSION_1 32
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VQ_MAX 128

struct vring_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct vring_avail { u16 flags; u16 idx; u16 ring[VQ_MAX]; u16 used_event; };
struct vring_used_elem { u32 id; u32 len; };
struct vring_used { u16 flags; u16 idx; struct vring_used_elem ring[VQ_MAX]; u16 avail_event; };

struct vq {
    u16 size, avail_idx, last_used, index;
    int mmio;                       /* notify by a 32-bit write of the index (virtio-mmio) */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    u64 notify;
};

struct vdev {
    u32 slot;
    u64 common, isr, device, notify_base;
    u32 notify_mult;
    u64 features;
    u64 mmio;                       /* virtio-mmio base, or 0 for virtio-pci */
};

struct vbuf { void *addr; u32 len; int write; };

/* Find a device by virtio device ID over the transport the command line names
 * (mmio=1: ACPI-described virtio-mmio slots; else virtio-pci). */
int virtio_find(struct vdev *v, u32 device_id);

/* virtio-mmio: slots found through ACPI (RSDP -> XSDT -> FADT -> DSDT, "LNRO0005") */
int acpi_virtio_mmio_slots(u64 *bases, int max);
/* Full bring-up of a virtio-mmio device at base with queue 0; returns device ID or -1. */
int virtio_mmio_setup(u64 base, u64 want, struct vq *q, u16 size, u64 *features);

int virtio_pci_find(u16 device_id, u32 *slot);
int virtio_pci_init(struct vdev *v, u32 slot);
int virtio_negotiate(struct vdev *v, u64 want);   /* returns 0 on FEATURES_OK */
int virtio_queue_setup(struct vdev *v, struct vq *q, u16 index, u16 size, u16 msix);
void virtio_driver_ok(struct vdev *v);
u8 virtio_status(struct vdev *v);
/* Publish one chain and notify; returns its head. */
u16 vq_submit(struct vq *q, const struct vbuf *bufs, int n);
/* Notify the device about queue q (transport-specific doorbell). */
static inline void virtio_kick(struct vq *q)
{
    if (q->mmio) *(volatile u32 *)q->notify = q->index;
    else *(volatile u16 *)q->notify = q->index;
}
/* Spin until the next used element; returns its written length or -1 on timeout. */
i64 vq_wait(struct vq *q, u64 spins);
/* One virtio-blk request on q, polled to completion: header, data (device-writable
 * unless type is OUT), status byte; returns the status (fails the guest on a timeout). */
int virtio_blk_io(struct vq *q, u32 type, u64 sector, void *data, u32 len);
#endif
