"""Interrupt controllers: KVM's own (``kernel``) or the split chip with the Python PIC
and IOAPIC (``split``), and the GSI routing table they share. Above the devices: a
device sees only an ``InterruptLine`` or an ``MsiSink`` (``pyvmm.irq``)."""
