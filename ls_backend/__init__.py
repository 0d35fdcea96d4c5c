"""Label Studio ML backend that pre-annotates images with YOLO and learns from every annotation."""
