"""DICOM networking and encoding, by layer.

- :mod:`~node.dicom.configure`: the node's pynetdicom set-up, applied explicitly by every
  entry point (importing a module here changes nothing in pynetdicom);
- :mod:`~node.dicom.sockets`: what the SCP and the SCU share (``TCP_NODELAY``, the listening
  socket, the SCU's event handlers);
- :mod:`~node.dicom.fastpath`: the PS3.8 data phase replacing pynetdicom's acceptor internals,
  the server around a shared listening socket, and the limits on untrusted peers;
- :mod:`~node.dicom.scp`: the SCP's policy (peers, audit, statistics);
- :mod:`~node.dicom.receive`: durable receipt of a C-STORE (spool + one transaction);
- :mod:`~node.dicom.encoding`: the one walker of encoded datasets (PS3.5) and the transfer
  syntax / VR constants; :mod:`~node.dicom.inspect`: the receive check built on it;
- :mod:`~node.dicom.scu`: the SCU (C-ECHO, export); :mod:`~node.dicom.contexts`,
  :mod:`~node.dicom.status`: presentation contexts and DIMSE statuses.
"""
