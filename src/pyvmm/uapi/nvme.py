"""NVMe names from Linux ``include/linux/nvme.h`` (NVM Express Base 1.4)."""

# Controller registers (BAR0)
NVME_REG_CAP = 0x00
NVME_REG_VS = 0x08
NVME_REG_INTMS = 0x0C
NVME_REG_INTMC = 0x10
NVME_REG_CC = 0x14
NVME_REG_CSTS = 0x1C
NVME_REG_NSSR = 0x20
NVME_REG_AQA = 0x24
NVME_REG_ASQ = 0x28
NVME_REG_ACQ = 0x30
NVME_REG_DBS = 0x1000  # doorbells: SQ y tail at DBS + 8y, CQ y head at DBS + 8y + 4

NVME_CC_ENABLE = 1 << 0
NVME_CC_SHN_SHIFT = 14
NVME_CC_SHN_MASK = 3 << NVME_CC_SHN_SHIFT
NVME_CSTS_RDY = 1 << 0
NVME_CSTS_CFS = 1 << 1
NVME_CSTS_SHST_CMPLT = 2 << 2

# Admin opcodes (enum nvme_admin_opcode)
nvme_admin_delete_sq = 0x00
nvme_admin_create_sq = 0x01
nvme_admin_get_log_page = 0x02
nvme_admin_delete_cq = 0x04
nvme_admin_create_cq = 0x05
nvme_admin_identify = 0x06
nvme_admin_abort_cmd = 0x08
nvme_admin_set_features = 0x09
nvme_admin_get_features = 0x0A
nvme_admin_async_event = 0x0C

# I/O opcodes (enum nvme_opcode)
nvme_cmd_flush = 0x00
nvme_cmd_write = 0x01
nvme_cmd_read = 0x02
nvme_cmd_write_zeroes = 0x08
nvme_cmd_dsm = 0x09

NVME_ID_CNS_NS = 0x00
NVME_ID_CNS_CTRL = 0x01
NVME_ID_CNS_NS_ACTIVE_LIST = 0x02

NVME_FEAT_ARBITRATION = 0x01
NVME_FEAT_POWER_MGMT = 0x02
NVME_FEAT_TEMP_THRESH = 0x04
NVME_FEAT_ERR_RECOVERY = 0x05
NVME_FEAT_VOLATILE_WC = 0x06
NVME_FEAT_NUM_QUEUES = 0x07
NVME_FEAT_IRQ_COALESCE = 0x08
NVME_FEAT_IRQ_CONFIG = 0x09
NVME_FEAT_WRITE_ATOMIC = 0x0A
NVME_FEAT_ASYNC_EVENT = 0x0B

NVME_QUEUE_PHYS_CONTIG = 1 << 0
NVME_CQ_IRQ_ENABLED = 1 << 1
NVME_DSMGMT_AD = 1 << 2  # deallocate

NVME_CTRL_ONCS_DSM = 1 << 2
NVME_CTRL_ONCS_WRITE_ZEROES = 1 << 3
NVME_CTRL_VWC_PRESENT = 1 << 0

# Status: (SCT << 8) | SC, as Linux's NVME_SC_* values
NVME_SC_SUCCESS = 0x0
NVME_SC_INVALID_OPCODE = 0x1
NVME_SC_INVALID_FIELD = 0x2
NVME_SC_DATA_XFER_ERROR = 0x4
NVME_SC_INTERNAL = 0x6
NVME_SC_INVALID_NS = 0xB
NVME_SC_LBA_RANGE = 0x80
NVME_SC_NS_WRITE_PROTECTED = 0x20
NVME_SC_CQ_INVALID = 0x100
NVME_SC_QID_INVALID = 0x101
NVME_SC_QUEUE_SIZE = 0x102
NVME_SC_ABORT_LIMIT = 0x103
NVME_SC_ASYNC_LIMIT = 0x105
NVME_SC_INVALID_VECTOR = 0x108
NVME_SC_INVALID_LOG_PAGE = 0x109
NVME_SC_FEATURE_NOT_SAVEABLE = 0x10D
NVME_SC_DELETE_INVALID = 0x10C  # invalid queue deletion (an SQ still uses the CQ)
NVME_SC_INVALID_PRP_OFFSET = 0x13
NVME_SC_DNR = 0x4000

NVME_PCI_CLASS = 0x010802  # mass storage, non-volatile memory, NVMe
