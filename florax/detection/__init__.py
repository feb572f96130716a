"""Dense object detection (ATSS head math for Florence's detection adapter)."""
